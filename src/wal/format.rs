//! The on-disk format of the write-ahead log: the only module that knows byte offsets.
//!
//! `wal-format.md` at the top of the repository describes the same layout for humans; the test
//! `tests/format_doc.rs` checks that the encoder still produces the bytes printed there.
//!
//! A segment file is a 64-byte [`SegmentHeader`] followed by records, each 8-byte aligned:
//!
//! ```text
//! record header (24 bytes)                 payload              padding
//! +------+----+-----+-----+-----+------+-----+------------------+---------+
//! | len  |type|flags| rsv | lsn | dist | crc | payload (len B)  | 0..7 x 0|
//! | u32  | u8 | u8  | u16 | u64 | u32  | u32 |                  |         |
//! +------+----+-----+-----+-----+------+-----+------------------+---------+
//!   0     4    5     6     8     16     20 -> see RH_* constants
//! ```
//!
//! `dist` (format version 2) is the durable distance: `lsn - durable bound`, where every LSN at
//! or below the bound was acknowledged durable when the record was written (0 = unknown);
//! `flags` bit 0 marks an LSN jump ([`RECORD_FLAG_LSN_JUMP`]). Both are zero in version 1.
//!
//! All integers are little-endian. The record checksum is CRC32 (Castagnoli is not used; this is
//! the IEEE polynomial of `crc32fast`) over `salt (8 bytes) || header bytes 0..20 || payload`,
//! where `salt` is the random per-segment value stored in the segment header. Bytes of an older
//! file, or of another segment, therefore never validate in this one.

use serde::{Deserialize, Serialize};

/// A log sequence number. Every record (entry, commit marker or checkpoint) takes the next one;
/// LSNs are dense and strictly increasing across segments and restarts.
pub type Lsn = u64;

/// Magic bytes at offset 0 of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SWALSEG\0";
/// The format version this build writes (version 2: the segment header carries the WAL's
/// identity, [`WalIdentity`]).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build still reads. Version 1 segments (no identity) open and
/// read; new segments are always written as [`FORMAT_VERSION`].
pub const OLDEST_READ_FORMAT_VERSION: u32 = 1;
/// Size of the segment header; the first record starts here.
pub const SEGMENT_HEADER_SIZE_BYTES: usize = 64;
/// Size of a record header.
pub const RECORD_HEADER_SIZE_BYTES: usize = 24;
/// Records start at offsets that are multiples of this.
pub const RECORD_ALIGNMENT_BYTES: usize = 8;
/// Hard limit on a record payload, enforced on write and on read: a corrupt length field can never
/// make a reader allocate or read more than this.
pub const MAX_PAYLOAD_SIZE_BYTES: usize = 64 * 1024;
/// Largest possible record on disk (header + maximal payload + padding).
pub const MAX_RECORD_SIZE_BYTES: usize =
    align_up(RECORD_HEADER_SIZE_BYTES + MAX_PAYLOAD_SIZE_BYTES);
/// Smallest allowed segment: room for the header and at least two maximal records.
pub const MIN_SEGMENT_SIZE_BYTES: u64 = 256 * 1024;
/// Largest allowed segment (offsets are kept in `u32`s).
pub const MAX_SEGMENT_SIZE_BYTES: u64 = 1 << 30;
/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 * 1024 * 1024;

const _: () = assert!(
    MIN_SEGMENT_SIZE_BYTES as usize >= SEGMENT_HEADER_SIZE_BYTES + 2 * MAX_RECORD_SIZE_BYTES
);
const _: () = assert!(SEGMENT_HEADER_SIZE_BYTES % RECORD_ALIGNMENT_BYTES == 0);
const _: () = assert!(RECORD_HEADER_SIZE_BYTES % RECORD_ALIGNMENT_BYTES == 0);

// Segment header field offsets.
const SH_MAGIC: usize = 0;
const SH_VERSION: usize = 8;
const SH_HEADER_SIZE: usize = 12;
const SH_FIRST_LSN: usize = 16;
const SH_SALT: usize = 24;
const SH_SEGMENT_SIZE: usize = 32;
/// Version 2: the WAL's random id (bytes 40..48; reserved zero in version 1).
const SH_WAL_ID: usize = 40;
/// Version 2: the owner id (bytes 48..56; reserved zero in version 1).
const SH_OWNER_ID: usize = 48;
/// Reserved zero bytes: 56..60 in version 2, 40..60 in version 1.
const SH_RESERVED_V2: usize = 56;
const SH_CRC: usize = 60;

// Record header field offsets.
const RH_LEN: usize = 0;
const RH_TYPE: usize = 4;
const RH_FLAGS: usize = 5;
const RH_RESERVED16: usize = 6;
const RH_LSN: usize = 8;
/// Version 2: the durable distance (`lsn - durable bound`, 0 = unknown); reserved zero in
/// version 1.
const RH_DURABLE_DISTANCE: usize = 16;
const RH_CRC: usize = 20;
/// Bytes of the record header covered by the checksum (everything before the CRC field).
const RH_CHECKSUMMED: usize = 20;

/// Record flag (version 2): this record's LSN is above the next expected LSN. A recovery cut a
/// hole of never-acknowledged records followed by valid ones (with LSNs up to this one's
/// minus 1) and wrote this record so that no LSN it saw is ever used again. Every other flag
/// bit is zero.
pub const RECORD_FLAG_LSN_JUMP: u8 = 1;
/// Smallest record on disk: a header and a 1-byte payload, padded.
pub const MIN_RECORD_SIZE_BYTES: usize = align_up(RECORD_HEADER_SIZE_BYTES + 1);
/// Largest LSN jump a [`RECORD_FLAG_LSN_JUMP`] record may make: the LSNs it skips were held by
/// records of one segment, so there were at most this many.
pub const MAX_LSN_JUMP: u64 = MAX_SEGMENT_SIZE_BYTES / MIN_RECORD_SIZE_BYTES as u64;

/// Rounds `n` up to the record alignment.
pub const fn align_up(n: usize) -> usize {
    n.div_ceil(RECORD_ALIGNMENT_BYTES) * RECORD_ALIGNMENT_BYTES
}

/// On-disk size of a record whose payload is `payload_len` bytes.
pub const fn record_size(payload_len: usize) -> usize {
    align_up(RECORD_HEADER_SIZE_BYTES + payload_len)
}

/// The file name of the segment whose first LSN is `first_lsn`. Zero-padded so that name order is
/// LSN order.
pub fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{first_lsn:020}.wal")
}

/// Parses a segment file name back into its first LSN; `None` for any other file name.
pub fn parse_segment_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The kind of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// An application entry (for settlement: one event with its balance post-images).
    Entry = 1,
    /// A commit marker: every entry in an inclusive LSN range took effect in the store.
    Commit = 2,
    /// A checkpoint: every entry at or below a watermark is committed.
    Checkpoint = 3,
}

impl RecordType {
    /// Decodes the type byte.
    pub fn from_byte(byte: u8) -> Option<RecordType> {
        match byte {
            1 => Some(RecordType::Entry),
            2 => Some(RecordType::Commit),
            3 => Some(RecordType::Checkpoint),
            _ => None,
        }
    }

    /// Lower-case name, as printed by tools.
    pub fn name(self) -> &'static str {
        match self {
            RecordType::Entry => "entry",
            RecordType::Commit => "commit",
            RecordType::Checkpoint => "checkpoint",
        }
    }
}

/// Payload of a [`RecordType::Commit`] record: entries `first_lsn..=last_lsn` are committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitPayload {
    /// First committed LSN (inclusive).
    pub first_lsn: Lsn,
    /// Last committed LSN (inclusive).
    pub last_lsn: Lsn,
}

/// Payload of a [`RecordType::Checkpoint`] record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPayload {
    /// Every entry with an LSN at or below this is committed.
    pub committed_watermark: Lsn,
    /// The first LSN still kept in the WAL directory after this checkpoint removed older segments.
    pub first_retained_lsn: Lsn,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_little_endian()
        .with_limit::<MAX_PAYLOAD_SIZE_BYTES>()
}

/// Encodes a serde value the way every WAL payload is encoded: bincode 2, fixed-width integers,
/// little-endian.
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, bincode_config())
}

/// Appends the same bytes as [`encode_payload`] to `buf` and returns how many it appended
/// (many payloads encoded into one reused buffer: no allocation per payload).
pub fn encode_payload_into<T: Serialize>(
    value: &T,
    buf: &mut Vec<u8>,
) -> Result<usize, bincode::error::EncodeError> {
    bincode::serde::encode_into_std_write(value, buf, bincode_config())
}

/// Decodes a payload written by [`encode_payload`]; trailing bytes are an error.
pub fn decode_payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, bincode_config())
        .map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the payload",
            bytes.len() - used
        ));
    }
    Ok(value)
}

/// Who a WAL is (format version 2, segment header bytes 40..56): `wal_id` is random and the same
/// in every segment of one WAL, so a segment of another WAL copied into the directory is refused
/// at open; `owner_id` is an opaque id of the store this WAL belongs to, set by the application
/// (0 = not bound), and may change from one segment to a later one ([`crate::wal::Wal::rebind`]):
/// the newest segment's value is the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalIdentity {
    /// Random, never 0, the same in every segment of one WAL.
    pub wal_id: u64,
    /// The store this WAL belongs to, as the application defines it; 0 = not bound.
    pub owner_id: u64,
}

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version of this segment: [`FORMAT_VERSION`] for every segment this build creates,
    /// [`OLDEST_READ_FORMAT_VERSION`] (1) for an older one, which has no identity.
    pub version: u32,
    /// LSN of the first record this segment holds (or will hold).
    pub first_lsn: Lsn,
    /// Random per-segment value mixed into every record checksum.
    pub salt: u64,
    /// File size at creation (the file is preallocated to exactly this).
    pub segment_size_bytes: u64,
    /// The WAL's identity: `Some` exactly for version 2 segments.
    pub identity: Option<WalIdentity>,
}

/// Why a segment header was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`SEGMENT_HEADER_SIZE_BYTES`] bytes.
    Truncated {
        /// How many bytes there were.
        len_bytes: usize,
    },
    /// The magic bytes are wrong: not a segment of ours at all.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The header checksum does not match.
    ChecksumMismatch {
        /// Stored value.
        stored: u32,
        /// Value computed over the header.
        computed: u32,
    },
    /// A field has an impossible value.
    BadField {
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Truncated { len_bytes } => write!(
                f,
                "segment header truncated: {len_bytes} of {SEGMENT_HEADER_SIZE_BYTES} bytes"
            ),
            HeaderError::BadMagic => write!(f, "bad magic (not a settlement-wal segment)"),
            HeaderError::UnsupportedVersion { found } => write!(
                f,
                "format version {found} is not supported (this build reads versions {OLDEST_READ_FORMAT_VERSION} to {FORMAT_VERSION})"
            ),
            HeaderError::ChecksumMismatch { stored, computed } => write!(
                f,
                "segment header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            HeaderError::BadField { reason } => write!(f, "segment header: {reason}"),
        }
    }
}

impl SegmentHeader {
    /// A header of the current format version ([`FORMAT_VERSION`]) carrying `identity`.
    pub fn new(
        first_lsn: Lsn,
        salt: u64,
        segment_size_bytes: u64,
        identity: WalIdentity,
    ) -> SegmentHeader {
        assert!(identity.wal_id != 0, "a wal_id is never 0");
        SegmentHeader {
            version: FORMAT_VERSION,
            first_lsn,
            salt,
            segment_size_bytes,
            identity: Some(identity),
        }
    }

    /// A version 1 header (no identity), as older builds wrote it. This build never creates
    /// one; tests and tools use it to build old segments.
    pub fn v1(first_lsn: Lsn, salt: u64, segment_size_bytes: u64) -> SegmentHeader {
        SegmentHeader {
            version: OLDEST_READ_FORMAT_VERSION,
            first_lsn,
            salt,
            segment_size_bytes,
            identity: None,
        }
    }

    /// Encodes the header into exactly [`SEGMENT_HEADER_SIZE_BYTES`] bytes, in its own version's
    /// layout.
    ///
    /// # Panics
    /// When the version and the identity disagree (a version 2 header needs an identity with a
    /// non-zero `wal_id`; a version 1 header has none) or the version is not one this build
    /// knows.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_SIZE_BYTES] {
        let mut b = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        b[SH_MAGIC..SH_MAGIC + 8].copy_from_slice(&SEGMENT_MAGIC);
        b[SH_VERSION..SH_VERSION + 4].copy_from_slice(&self.version.to_le_bytes());
        b[SH_HEADER_SIZE..SH_HEADER_SIZE + 4]
            .copy_from_slice(&(SEGMENT_HEADER_SIZE_BYTES as u32).to_le_bytes());
        b[SH_FIRST_LSN..SH_FIRST_LSN + 8].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[SH_SALT..SH_SALT + 8].copy_from_slice(&self.salt.to_le_bytes());
        b[SH_SEGMENT_SIZE..SH_SEGMENT_SIZE + 8]
            .copy_from_slice(&self.segment_size_bytes.to_le_bytes());
        match (self.version, self.identity) {
            (1, None) => {}
            (2, Some(id)) => {
                assert!(id.wal_id != 0, "a version 2 header needs a non-zero wal_id");
                b[SH_WAL_ID..SH_WAL_ID + 8].copy_from_slice(&id.wal_id.to_le_bytes());
                b[SH_OWNER_ID..SH_OWNER_ID + 8].copy_from_slice(&id.owner_id.to_le_bytes());
            }
            (version, identity) => panic!(
                "cannot encode a version {version} segment header with identity {identity:?}"
            ),
        }
        let crc = crc32fast::hash(&b[..SH_CRC]);
        b[SH_CRC..SH_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and verifies a header (version 1 or 2) from the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if bytes.len() < SEGMENT_HEADER_SIZE_BYTES {
            // A short file that starts with our magic is a truncated segment; anything else is foreign.
            let n = bytes.len().min(8);
            if bytes[..n] != SEGMENT_MAGIC[..n] || n == 0 {
                return Err(if n == 0 {
                    HeaderError::Truncated { len_bytes: 0 }
                } else {
                    HeaderError::BadMagic
                });
            }
            return Err(HeaderError::Truncated {
                len_bytes: bytes.len(),
            });
        }
        let b = &bytes[..SEGMENT_HEADER_SIZE_BYTES];
        if b[SH_MAGIC..SH_MAGIC + 8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let stored = read_u32(b, SH_CRC);
        let computed = crc32fast::hash(&b[..SH_CRC]);
        if stored != computed {
            return Err(HeaderError::ChecksumMismatch { stored, computed });
        }
        let version = read_u32(b, SH_VERSION);
        if !(OLDEST_READ_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(HeaderError::UnsupportedVersion { found: version });
        }
        let header_size = read_u32(b, SH_HEADER_SIZE) as usize;
        if header_size != SEGMENT_HEADER_SIZE_BYTES {
            return Err(HeaderError::BadField {
                reason: format!("header size {header_size}, expected {SEGMENT_HEADER_SIZE_BYTES}"),
            });
        }
        let segment_size_bytes = read_u64(b, SH_SEGMENT_SIZE);
        if !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&segment_size_bytes)
            || segment_size_bytes % RECORD_ALIGNMENT_BYTES as u64 != 0
        {
            return Err(HeaderError::BadField {
                reason: format!("segment size {segment_size_bytes} bytes is out of range"),
            });
        }
        let identity = if version == 1 {
            if b[SH_WAL_ID..SH_CRC].iter().any(|&x| x != 0) {
                return Err(HeaderError::BadField {
                    reason: format!(
                        "reserved bytes {SH_WAL_ID}..{SH_CRC} of a version 1 header are not zero"
                    ),
                });
            }
            None
        } else {
            if b[SH_RESERVED_V2..SH_CRC].iter().any(|&x| x != 0) {
                return Err(HeaderError::BadField {
                    reason: format!("reserved bytes {SH_RESERVED_V2}..{SH_CRC} are not zero"),
                });
            }
            let wal_id = read_u64(b, SH_WAL_ID);
            if wal_id == 0 {
                return Err(HeaderError::BadField {
                    reason: format!(
                        "wal_id (bytes {SH_WAL_ID}..{SH_OWNER_ID}) is 0 in a version 2 header"
                    ),
                });
            }
            Some(WalIdentity {
                wal_id,
                owner_id: read_u64(b, SH_OWNER_ID),
            })
        };
        Ok(SegmentHeader {
            version,
            first_lsn: read_u64(b, SH_FIRST_LSN),
            salt: read_u64(b, SH_SALT),
            segment_size_bytes,
            identity,
        })
    }

    /// The checksum state every record of this segment starts from.
    pub fn record_hasher(&self) -> crc32fast::Hasher {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.salt.to_le_bytes());
        h
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What a version 2 record header says besides type, LSN and length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordMeta {
    /// Every LSN at or below this was acknowledged durable when the record was written (`None`:
    /// unknown, as in every version 1 record). Stored as the distance `lsn - bound` in bytes
    /// 16..20; a distance that does not fit is stored as 0 (unknown), which recovery treats as
    /// "everything before this record may have been acknowledged".
    pub durable_bound: Option<Lsn>,
    /// [`RECORD_FLAG_LSN_JUMP`]: this record's LSN is above the next expected one.
    pub lsn_jump: bool,
}

/// Builds the 24-byte header of a record without [`RecordMeta`] (bound unknown, no flags: bytes
/// valid in a version 1 and a version 2 segment) and returns it with the checksum filled in.
pub fn encode_record_header(
    hasher: &crc32fast::Hasher,
    record_type: RecordType,
    lsn: Lsn,
    payload: &[u8],
) -> [u8; RECORD_HEADER_SIZE_BYTES] {
    encode_record_header_with(hasher, record_type, lsn, RecordMeta::default(), payload)
}

/// The durable distance stored for `bound` in the record `lsn`: `lsn - bound`, or 0 (unknown)
/// when it does not fit in 32 bits.
fn durable_distance(lsn: Lsn, bound: Option<Lsn>) -> u32 {
    match bound {
        Some(bound) => {
            assert!(
                bound < lsn,
                "durable bound {bound} of record {lsn} is not below it"
            );
            u32::try_from(lsn - bound).unwrap_or(0)
        }
        None => 0,
    }
}

/// Builds the 24-byte header of a version 2 record carrying `meta` and returns it with the
/// record checksum filled in.
pub fn encode_record_header_with(
    hasher: &crc32fast::Hasher,
    record_type: RecordType,
    lsn: Lsn,
    meta: RecordMeta,
    payload: &[u8],
) -> [u8; RECORD_HEADER_SIZE_BYTES] {
    assert!(
        !payload.is_empty(),
        "a record payload is never empty (zero length marks the end)"
    );
    assert!(
        payload.len() <= MAX_PAYLOAD_SIZE_BYTES,
        "payload over the record limit"
    );
    let mut h = [0u8; RECORD_HEADER_SIZE_BYTES];
    h[RH_LEN..RH_LEN + 4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[RH_TYPE] = record_type as u8;
    if meta.lsn_jump {
        h[RH_FLAGS] = RECORD_FLAG_LSN_JUMP;
    }
    h[RH_LSN..RH_LSN + 8].copy_from_slice(&lsn.to_le_bytes());
    h[RH_DURABLE_DISTANCE..RH_DURABLE_DISTANCE + 4]
        .copy_from_slice(&durable_distance(lsn, meta.durable_bound).to_le_bytes());
    let mut crc = hasher.clone();
    crc.update(&h[..RH_CHECKSUMMED]);
    crc.update(payload);
    h[RH_CRC..RH_CRC + 4].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Encodes a whole record (header, payload, zero padding) into a new buffer. The writer writes
/// the same bytes straight into the mapped segment; this helper is for tests and tools.
pub fn encode_record(
    hasher: &crc32fast::Hasher,
    record_type: RecordType,
    lsn: Lsn,
    payload: &[u8],
) -> Vec<u8> {
    encode_record_with(hasher, record_type, lsn, RecordMeta::default(), payload)
}

/// [`encode_record`] of a version 2 record carrying `meta`.
pub fn encode_record_with(
    hasher: &crc32fast::Hasher,
    record_type: RecordType,
    lsn: Lsn,
    meta: RecordMeta,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![0u8; record_size(payload.len())];
    out[..RECORD_HEADER_SIZE_BYTES].copy_from_slice(&encode_record_header_with(
        hasher,
        record_type,
        lsn,
        meta,
        payload,
    ));
    out[RECORD_HEADER_SIZE_BYTES..RECORD_HEADER_SIZE_BYTES + payload.len()]
        .copy_from_slice(payload);
    out
}

/// A record that passed every check, borrowed from the segment bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Byte offset of the record header in its segment.
    pub offset: usize,
    /// The record's type.
    pub record_type: RecordType,
    /// The record's LSN.
    pub lsn: Lsn,
    /// The payload bytes.
    pub payload: &'a [u8],
    /// Total on-disk size including header and padding. (At the very end of a truncated file the
    /// padding may lie past the bytes given.)
    pub size_bytes: usize,
    /// The durable bound and flags of the header (all unknown/clear in a version 1 record).
    pub meta: RecordMeta,
}

/// Why the bytes at an offset are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The header or the payload runs past the end of the segment bytes.
    Truncated {
        /// Bytes the record claims to need.
        needed_bytes: usize,
        /// Bytes available.
        available_bytes: usize,
    },
    /// The length field exceeds [`MAX_PAYLOAD_SIZE_BYTES`].
    LengthTooLarge {
        /// The length field's value.
        len_bytes: u32,
    },
    /// Zero length, but other header bytes are set: a partly written header.
    ZeroLengthNotEmpty,
    /// An unknown record type byte.
    BadType {
        /// The byte found.
        found: u8,
    },
    /// Flags or reserved bytes hold a value the segment's format version does not allow
    /// (version 1: anything but zero; version 2: a flag other than [`RECORD_FLAG_LSN_JUMP`],
    /// non-zero bytes 6..8, or a durable distance larger than the LSN).
    NonZeroReserved,
    /// The checksum does not match.
    ChecksumMismatch {
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// Padding after the payload is not zero.
    NonZeroPadding,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated {
                needed_bytes,
                available_bytes,
            } => write!(
                f,
                "record truncated: needs {needed_bytes} bytes, {available_bytes} left in the segment"
            ),
            RecordError::LengthTooLarge { len_bytes } => write!(
                f,
                "record length {len_bytes} exceeds the limit of {MAX_PAYLOAD_SIZE_BYTES} bytes"
            ),
            RecordError::ZeroLengthNotEmpty => {
                write!(f, "zero length field but the rest of the record header is not zero")
            }
            RecordError::BadType { found } => write!(f, "unknown record type {found}"),
            RecordError::NonZeroReserved => write!(
                f,
                "flags or reserved header bytes hold a value this format version does not allow"
            ),
            RecordError::ChecksumMismatch { stored, computed } => write!(
                f,
                "record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            RecordError::NonZeroPadding => write!(f, "padding after the payload is not zero"),
        }
    }
}

/// What is at an offset of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record.
    Record(RecordView<'a>),
    /// A zero record header (or zero bytes to the end of the segment): the end of the log here.
    End,
    /// Not a valid record.
    Invalid(RecordError),
}

/// Decodes the record starting at `offset` of `segment` (the whole segment's bytes) by the
/// rules of the current [`FORMAT_VERSION`]. Never panics and never reads outside `segment` or
/// more than [`MAX_RECORD_SIZE_BYTES`] past `offset`.
pub fn decode_record<'a>(
    segment: &'a [u8],
    offset: usize,
    hasher: &crc32fast::Hasher,
) -> Decoded<'a> {
    decode_record_in(segment, offset, hasher, FORMAT_VERSION)
}

/// [`decode_record`] by the rules of format `version` (the segment header's): version 1 records
/// have zero flags and zero bytes 16..20.
pub fn decode_record_in<'a>(
    segment: &'a [u8],
    offset: usize,
    hasher: &crc32fast::Hasher,
    version: u32,
) -> Decoded<'a> {
    let available = segment.len().saturating_sub(offset);
    if available < RECORD_HEADER_SIZE_BYTES {
        let rest = segment.get(offset..).unwrap_or(&[]);
        return if rest.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Invalid(RecordError::Truncated {
                needed_bytes: RECORD_HEADER_SIZE_BYTES,
                available_bytes: available,
            })
        };
    }
    let h = &segment[offset..offset + RECORD_HEADER_SIZE_BYTES];
    let len = read_u32(h, RH_LEN);
    if len == 0 {
        return if h.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Invalid(RecordError::ZeroLengthNotEmpty)
        };
    }
    if len as usize > MAX_PAYLOAD_SIZE_BYTES {
        return Decoded::Invalid(RecordError::LengthTooLarge { len_bytes: len });
    }
    let Some(record_type) = RecordType::from_byte(h[RH_TYPE]) else {
        return Decoded::Invalid(RecordError::BadType { found: h[RH_TYPE] });
    };
    let lsn = read_u64(h, RH_LSN);
    let distance = read_u32(h, RH_DURABLE_DISTANCE);
    let allowed_flags = if version >= 2 {
        RECORD_FLAG_LSN_JUMP
    } else {
        0
    };
    if h[RH_FLAGS] & !allowed_flags != 0
        || h[RH_RESERVED16..RH_RESERVED16 + 2] != [0, 0]
        || (version < 2 && distance != 0)
        || u64::from(distance) > lsn
    {
        return Decoded::Invalid(RecordError::NonZeroReserved);
    }
    let meta = RecordMeta {
        durable_bound: (distance != 0).then(|| lsn - u64::from(distance)),
        lsn_jump: h[RH_FLAGS] & RECORD_FLAG_LSN_JUMP != 0,
    };
    let size = record_size(len as usize);
    // Only header and payload must be present: padding cut off by the end of a short (truncated)
    // file reads as the zeros the file is re-extended with.
    if RECORD_HEADER_SIZE_BYTES + len as usize > available {
        return Decoded::Invalid(RecordError::Truncated {
            needed_bytes: RECORD_HEADER_SIZE_BYTES + len as usize,
            available_bytes: available,
        });
    }
    let payload_start = offset + RECORD_HEADER_SIZE_BYTES;
    let payload = &segment[payload_start..payload_start + len as usize];
    let stored = read_u32(h, RH_CRC);
    let mut crc = hasher.clone();
    crc.update(&h[..RH_CHECKSUMMED]);
    crc.update(payload);
    let computed = crc.finalize();
    if stored != computed {
        return Decoded::Invalid(RecordError::ChecksumMismatch { stored, computed });
    }
    if segment[payload_start + len as usize..(offset + size).min(segment.len())]
        .iter()
        .any(|&b| b != 0)
    {
        return Decoded::Invalid(RecordError::NonZeroPadding);
    }
    Decoded::Record(RecordView {
        offset,
        record_type,
        lsn,
        payload,
        size_bytes: size,
        meta,
    })
}
