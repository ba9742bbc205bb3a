//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so the stable `cargo test` runs exactly the fuzzed code paths.
//! Each function panics only when a WAL invariant is broken, never on bad input.

use std::path::Path;

use super::format::{
    decode_payload, decode_record, record_size, CheckpointPayload, CommitPayload, Decoded,
    SegmentHeader, WalIdentity, MAX_PAYLOAD_SIZE_BYTES, MIN_SEGMENT_SIZE_BYTES,
    RECORD_ALIGNMENT_BYTES, SEGMENT_HEADER_SIZE_BYTES,
};
use super::{inspect, TailState, Wal, WalError, WalOptions};

/// Feeds arbitrary bytes to the header decoder, the record decoder (at every aligned offset) and
/// the payload decoders.
pub fn decode_arbitrary(data: &[u8]) {
    let _ = SegmentHeader::decode(data);
    let salt = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let hasher = SegmentHeader::new(
        1,
        salt,
        MIN_SEGMENT_SIZE_BYTES,
        WalIdentity {
            wal_id: 1,
            owner_id: 0,
        },
    )
    .record_hasher();
    let mut offset = 0;
    while offset <= data.len() {
        if let Decoded::Record(r) = decode_record(data, offset, &hasher) {
            assert!(r.payload.len() <= MAX_PAYLOAD_SIZE_BYTES);
            assert_eq!(r.size_bytes, record_size(r.payload.len()));
            assert!(r.offset + 24 + r.payload.len() <= data.len());
        }
        offset += RECORD_ALIGNMENT_BYTES;
    }
    let _ = decode_payload::<CommitPayload>(data);
    let _ = decode_payload::<CheckpointPayload>(data);
}

/// Writes arbitrary bytes as the only segment of a fresh WAL directory under `scratch` and runs
/// the recovery scan over it, read-only and then for writing. The first byte picks the mode:
/// even = the bytes are the whole file; odd = a valid header (first LSN 1, salt from the next 8
/// bytes) followed by the rest as the record area, padded with zeros to the minimum segment size.
///
/// Invariants: inspection and opening agree (clean or torn tail: open succeeds; corruption: open
/// fails with `Corrupt` and changes nothing), and after a successful open the WAL is clean.
pub fn scan_arbitrary_segment(data: &[u8], scratch: &Path) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).expect("create scratch dir");
    let file = scratch.join("00000000000000000001.wal");
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let salt = rest
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let body = rest.get(8..).unwrap_or(&[]);
        let size = MIN_SEGMENT_SIZE_BYTES as usize;
        let identity = WalIdentity {
            wal_id: salt | 1,
            owner_id: 0,
        };
        let mut bytes = SegmentHeader::new(1, salt, size as u64, identity)
            .encode()
            .to_vec();
        let take = body.len().min(size - SEGMENT_HEADER_SIZE_BYTES);
        bytes.extend_from_slice(&body[..take]);
        bytes.resize(size, 0);
        bytes
    };
    std::fs::write(&file, &bytes).expect("write scratch segment");
    let view = inspect(scratch);
    let opts = WalOptions::default().segment_size_bytes(MIN_SEGMENT_SIZE_BYTES);
    let opened = Wal::open(scratch, opts.clone());
    match (&view, &opened) {
        (Ok(v), Ok(_)) => assert!(
            v.is_clean() || v.is_torn_only(),
            "open succeeded on a WAL inspection called corrupt: {:?}",
            v.problem
        ),
        (
            Ok(v),
            Err(
                WalError::Corrupt { .. }
                | WalError::NotAWal { .. }
                | WalError::UnsupportedVersion { .. },
            ),
        ) => {
            assert!(matches!(v.problem, Some((_, TailState::Corrupt { .. }))));
            let after = std::fs::read(&file).expect("read back");
            assert!(after == bytes, "a failed open changed the file");
        }
        (Ok(v), Err(e)) => panic!("inspection gave {:?} but open failed with {e}", v.problem),
        (Err(_), Ok(_)) => panic!("open succeeded where inspection failed"),
        (Err(_), Err(_)) => {}
    }
    if let Ok(wal) = opened {
        let pending = wal.pending().expect("pending after open");
        drop(wal);
        let again = inspect(scratch).expect("inspect after repair");
        assert!(
            again.is_clean(),
            "not clean after open: {:?}",
            again.problem
        );
        assert_eq!(
            again.pending,
            pending.iter().map(|e| e.lsn).collect::<Vec<_>>()
        );
        let reopened = Wal::open(scratch, opts).expect("reopen");
        assert!(reopened.open_report().torn_tail.is_none());
    }
}

/// A scratch directory for one fuzzing process: under `/dev/shm` when it is writable (the fuzz
/// targets create, sync and delete files on every input; tmpfs keeps that cheap, and nothing here
/// relies on a real sync, since a dropped WAL's pages stay in the page cache exactly like after a
/// SIGKILL), otherwise under the system temporary directory. The name carries `name` and the pid.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let leaf = format!("{name}-{}", std::process::id());
    let shm = Path::new("/dev/shm");
    let probe = shm.join(format!("{leaf}.probe"));
    if std::fs::write(&probe, b"").is_ok() {
        let _ = std::fs::remove_file(&probe);
        return shm.join(leaf);
    }
    std::env::temp_dir().join(leaf)
}

/// Most operations one [`wal_ops`] input runs.
pub const OPS_MAX: usize = 256;
/// Most payload bytes one [`wal_ops`] input appends (about six 256 KiB segments).
pub const OPS_APPEND_BUDGET_BYTES: usize = 1536 * 1024;

/// Runs the operation sequence that `data` decodes to against a real WAL in `scratch` (256 KiB
/// segments; the directory is recreated), next to a model of what the WAL must hold, and panics
/// as soon as the two disagree.
///
/// The input is read one operation at a time; the first byte of each picks it (mod 16):
///
/// | byte | operation | bytes that follow |
/// |---|---|---|
/// | 0-4 | append 1-8 entries (`append` for one, `append_batch` for more); size class 7 is an invalid payload (empty or over the record limit) that must be refused | count, size class, seed |
/// | 5-7 | sync | - |
/// | 8-9 | commit a range (valid over the durable entries, or arbitrary and then checked against the rules) | mode, a, b |
/// | 10 | checkpoint | - |
/// | 11-12 | crash-cut: drop the WAL, then truncate or zero one segment from an offset to its end | segment, how, offset (u16) |
/// | 13 | bit-flip: drop the WAL, then flip one bit of one segment; with `how & 8`, zero the 512-byte sector holding that offset instead (a power cut's hole) | segment, how, offset (u16), bit |
/// | 14-15 | reopen (a clean drop and open) | - |
///
/// Missing bytes read as zero; at most [`OPS_MAX`] operations and [`OPS_APPEND_BUDGET_BYTES`]
/// payload bytes are used. Damage accumulates while the WAL is closed; the next operation that
/// needs the WAL opens it. Before opening, the expected outcome is derived from the bytes alone
/// (which records still have their original bytes, and the rule of wal-format.md):
///
/// - undamaged records all survive; nothing appears that was not appended, and every payload reads
///   back byte for byte (checked through `pending()` and a full read-only inspection);
/// - a damaged record in the newest segment with no intact record after it is a torn tail: the
///   open succeeds, reports the cut at that record's offset, and exactly the records from it on
///   are lost (the model forgets them too; their LSNs are reused);
/// - a damaged record followed by an intact one, or in a sealed segment, or a damaged segment
///   header, makes the open fail with [`WalError::Corrupt`] naming that file, byte offset and
///   expected LSN ([`WalError::NotAWal`] for a damaged magic), and change nothing on disk; the
///   harness then restores the files and goes on;
/// - a cut at or after the durable end of the newest segment (a crash) never loses a synced record;
/// - the read-only inspection reports the same problem (or none) as the open;
/// - pending = appended minus committed, the committed watermark and `last_lsn`/`durable_lsn`
///   match the model after every operation, and a checkpoint removes only fully committed segments.
pub fn wal_ops(data: &[u8], scratch: &Path) {
    let trace = std::env::var_os("WAL_OPS_TRACE").is_some();
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).expect("create scratch dir");
    let mut run = ops::Run::new(scratch, trace);
    let mut input = ops::Input::new(data);
    let mut count = 0;
    while !input.is_done() && count < OPS_MAX {
        let op = ops::Op::decode(&mut input);
        run.apply(count, op);
        count += 1;
    }
    run.finish();
    let _ = std::fs::remove_dir_all(scratch);
}

/// Builds a [`wal_ops`] input from readable operations (for seed corpora and tests).
pub fn wal_ops_input(ops: &[WalOpsStep]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        match *op {
            WalOpsStep::Append { count, class, seed } => {
                out.extend_from_slice(&[0, count.saturating_sub(1), class, seed])
            }
            WalOpsStep::Sync => out.push(5),
            WalOpsStep::Commit { mode, a, b } => out.extend_from_slice(&[8, mode, a, b]),
            WalOpsStep::Checkpoint => out.push(10),
            WalOpsStep::CrashCut { segment, how, at } => {
                out.extend_from_slice(&[11, segment, how]);
                out.extend_from_slice(&at.to_le_bytes());
            }
            WalOpsStep::BitFlip {
                segment,
                how,
                at,
                bit,
            } => {
                out.extend_from_slice(&[13, segment, how]);
                out.extend_from_slice(&at.to_le_bytes());
                out.push(bit);
            }
            WalOpsStep::Reopen => out.push(14),
        }
    }
    out
}

/// One operation of a [`wal_ops`] input, in readable form (see [`wal_ops`] for the encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalOpsStep {
    /// Append `count` entries (1-8; one with `append`, more with `append_batch`); payload sizes
    /// from `class` (mod 8: 0-2 up to 64 bytes, 3-4 up to 2 KiB, 5 8 KiB to 64 KiB, 6 exactly the
    /// record limit, 7 an invalid payload), contents from `seed` (bit 7: mostly zero bytes).
    Append {
        /// Entries, 1 to 8.
        count: u8,
        /// Size class.
        class: u8,
        /// Content seed.
        seed: u8,
    },
    /// `sync()`.
    Sync,
    /// `commit_range`: `mode % 4 != 0` picks a valid range over the durable LSNs (`a`, `b` scaled),
    /// `mode % 4 == 0` an arbitrary one.
    Commit {
        /// Valid or arbitrary.
        mode: u8,
        /// First end of the range.
        a: u8,
        /// Other end of the range.
        b: u8,
    },
    /// `checkpoint()`.
    Checkpoint,
    /// Drop the WAL, then cut a segment: `segment` picks it (`% 4 != 0`: the newest), `how` bit 0
    /// truncates (0) or zero-fills (1), `(how >> 1) % 4` picks the region (anywhere, the records,
    /// the unsynced tail, the last record), `at` the position in it.
    CrashCut {
        /// Which segment.
        segment: u8,
        /// Mode and region.
        how: u8,
        /// Position within the region (scaled).
        at: u16,
    },
    /// Drop the WAL, then flip bit `bit % 8` of one byte: `segment` as for `CrashCut`, `how % 4`
    /// the region (anywhere, the records, the unsynced tail, the last record), `at` the position.
    BitFlip {
        /// Which segment.
        segment: u8,
        /// Region.
        how: u8,
        /// Position within the region (scaled).
        at: u16,
        /// Which bit.
        bit: u8,
    },
    /// Drop the WAL cleanly and open it again.
    Reopen,
}

mod ops {
    //! The model and the checks behind [`super::wal_ops`].

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    use super::super::format::{
        decode_record, encode_payload, parse_segment_file_name, record_size, CheckpointPayload,
        CommitPayload, Decoded, Lsn, RecordType, SegmentHeader, MAX_PAYLOAD_SIZE_BYTES,
        MIN_SEGMENT_SIZE_BYTES, RECORD_HEADER_SIZE_BYTES, SEGMENT_HEADER_SIZE_BYTES, SEGMENT_MAGIC,
    };
    use super::super::{inspect, inspect_with, TailState, Wal, WalError, WalOptions};
    use super::{OPS_APPEND_BUDGET_BYTES, OPS_MAX};

    /// The fuzz input, read byte by byte; past the end every byte reads as zero.
    pub(super) struct Input<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl<'a> Input<'a> {
        pub(super) fn new(data: &'a [u8]) -> Self {
            Input { data, pos: 0 }
        }

        pub(super) fn is_done(&self) -> bool {
            self.pos >= self.data.len()
        }

        fn u8(&mut self) -> u8 {
            let b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
            b
        }

        fn u16(&mut self) -> u16 {
            u16::from_le_bytes([self.u8(), self.u8()])
        }
    }

    /// One decoded operation.
    #[derive(Clone, Copy, Debug)]
    pub(super) enum Op {
        Append {
            count: usize,
            class: u8,
            seed: u8,
        },
        Sync,
        Commit {
            mode: u8,
            a: u8,
            b: u8,
        },
        Checkpoint,
        CrashCut {
            segment: u8,
            how: u8,
            at: u16,
        },
        BitFlip {
            segment: u8,
            how: u8,
            at: u16,
            bit: u8,
        },
        Reopen,
    }

    impl Op {
        pub(super) fn decode(input: &mut Input<'_>) -> Op {
            match input.u8() % 16 {
                0..=4 => Op::Append {
                    count: 1 + (input.u8() % 8) as usize,
                    class: input.u8(),
                    seed: input.u8(),
                },
                5..=7 => Op::Sync,
                8 | 9 => Op::Commit {
                    mode: input.u8(),
                    a: input.u8(),
                    b: input.u8(),
                },
                10 => Op::Checkpoint,
                11 | 12 => Op::CrashCut {
                    segment: input.u8(),
                    how: input.u8(),
                    at: input.u16(),
                },
                13 => Op::BitFlip {
                    segment: input.u8(),
                    how: input.u8(),
                    at: input.u16(),
                    bit: input.u8(),
                },
                _ => Op::Reopen,
            }
        }
    }

    /// What the model knows about one record.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Rec {
        Entry(Vec<u8>),
        Commit(Lsn, Lsn),
        Checkpoint(Lsn, Lsn),
    }

    impl Rec {
        fn record_type(&self) -> RecordType {
            match self {
                Rec::Entry(_) => RecordType::Entry,
                Rec::Commit(..) => RecordType::Commit,
                Rec::Checkpoint(..) => RecordType::Checkpoint,
            }
        }

        fn payload(&self) -> Vec<u8> {
            match self {
                Rec::Entry(p) => p.clone(),
                Rec::Commit(first_lsn, last_lsn) => encode_payload(&CommitPayload {
                    first_lsn: *first_lsn,
                    last_lsn: *last_lsn,
                })
                .expect("encodes"),
                Rec::Checkpoint(w, f) => encode_payload(&CheckpointPayload {
                    committed_watermark: *w,
                    first_retained_lsn: *f,
                })
                .expect("encodes"),
            }
        }
    }

    /// The model: every record the WAL must hold, independent of the WAL's own tracker.
    #[derive(Debug)]
    struct Model {
        /// Every record appended and not lost (records of removed segments included).
        records: BTreeMap<Lsn, Rec>,
        /// Entries in live segments without a commit marker or checkpoint covering them.
        pending: BTreeSet<Lsn>,
        next_lsn: Lsn,
        durable_lsn: Lsn,
        /// First LSN of the oldest segment file (records below it were removed by checkpoints).
        first_live_lsn: Lsn,
        appended_bytes: usize,
        /// For each record appended: the durable LSN when it was appended (its header's durable
        /// bound must be at least this).
        bound_floor: BTreeMap<Lsn, Lsn>,
    }

    impl Model {
        fn new() -> Model {
            Model {
                records: BTreeMap::new(),
                pending: BTreeSet::new(),
                next_lsn: 1,
                durable_lsn: 0,
                first_live_lsn: 1,
                appended_bytes: 0,
                bound_floor: BTreeMap::new(),
            }
        }

        fn push(&mut self, rec: Rec) -> Lsn {
            let lsn = self.next_lsn;
            match &rec {
                Rec::Entry(_) => {
                    self.pending.insert(lsn);
                }
                Rec::Commit(first, last) => self.mark_committed(*first, *last),
                Rec::Checkpoint(w, _) => self.mark_committed(1, *w),
            }
            self.records.insert(lsn, rec);
            self.bound_floor.insert(lsn, self.durable_lsn);
            self.next_lsn += 1;
            lsn
        }

        fn mark_committed(&mut self, first: Lsn, last: Lsn) {
            if first <= last {
                let done: Vec<Lsn> = self.pending.range(first..=last).copied().collect();
                for lsn in done {
                    self.pending.remove(&lsn);
                }
            }
        }

        /// Forgets every record at or after `lsn` (lost to damage), recomputing what is pending.
        fn lose_from(&mut self, lsn: Lsn) {
            assert!(
                lsn >= self.first_live_lsn,
                "records of removed segments cannot be lost"
            );
            let kept = std::mem::take(&mut self.records);
            self.pending.clear();
            self.next_lsn = lsn;
            for (l, rec) in kept.range(..lsn) {
                match rec {
                    Rec::Entry(_) if *l >= self.first_live_lsn => {
                        self.pending.insert(*l);
                    }
                    Rec::Entry(_) => {}
                    Rec::Commit(first, last) => self.mark_committed(*first, *last),
                    Rec::Checkpoint(w, _) => self.mark_committed(1, *w),
                }
            }
            self.records = kept.into_iter().filter(|(l, _)| *l < lsn).collect();
            self.bound_floor.retain(|l, _| *l < lsn);
        }

        fn watermark(&self) -> Lsn {
            self.pending
                .first()
                .map_or(self.next_lsn - 1, |first| first - 1)
        }

        fn pending_entries(&self) -> Vec<(Lsn, Vec<u8>)> {
            self.pending
                .iter()
                .map(|lsn| match &self.records[lsn] {
                    Rec::Entry(p) => (*lsn, p.clone()),
                    other => panic!("model: pending LSN {lsn} is not an entry: {other:?}"),
                })
                .collect()
        }

        fn newest_entry(&self) -> Option<Lsn> {
            self.records
                .iter()
                .rev()
                .find(|(_, r)| matches!(r, Rec::Entry(_)))
                .map(|(l, _)| *l)
        }
    }

    /// One segment file as it was when the WAL was dropped.
    #[derive(Debug)]
    struct SnapFile {
        path: PathBuf,
        first_lsn: Lsn,
        bytes: Vec<u8>,
    }

    /// One record as it was when the WAL was dropped.
    #[derive(Clone, Copy, Debug)]
    struct SnapRec {
        file: usize,
        offset: usize,
        payload_len: usize,
        lsn: Lsn,
        /// The durable bound in its header (`None` in a version 1 segment).
        bound: Option<Lsn>,
    }

    impl SnapRec {
        fn end(&self) -> usize {
            self.offset + record_size(self.payload_len)
        }
    }

    /// The WAL directory as it was when the WAL was dropped, and what was done to it since.
    #[derive(Debug)]
    struct Snapshot {
        files: Vec<SnapFile>,
        records: Vec<SnapRec>,
        durable_lsn: Lsn,
        /// Every change since the drop was a cut at or after the newest segment's durable end
        /// (what a crash can do), so no synced record may be lost.
        crash_only: bool,
        damaged: bool,
    }

    impl Snapshot {
        fn records_of(&self, file: usize) -> impl Iterator<Item = &SnapRec> + '_ {
            self.records.iter().filter(move |r| r.file == file)
        }

        /// Offset just past the last record of `file` (the header end when it has none).
        fn used_end(&self, file: usize) -> usize {
            self.records_of(file)
                .last()
                .map_or(SEGMENT_HEADER_SIZE_BYTES, SnapRec::end)
        }

        /// Offset just past the last durable record of `file`.
        fn durable_end(&self, file: usize) -> usize {
            if file + 1 < self.files.len() {
                return self.used_end(file);
            }
            self.records_of(file)
                .filter(|r| r.lsn <= self.durable_lsn)
                .last()
                .map_or(SEGMENT_HEADER_SIZE_BYTES, SnapRec::end)
        }

        fn last_record_offset(&self, file: usize) -> usize {
            self.records_of(file)
                .last()
                .map_or(SEGMENT_HEADER_SIZE_BYTES, |r| r.offset)
        }

        fn pick_file(&self, selector: u8) -> usize {
            let n = self.files.len();
            if selector % 4 != 0 {
                n - 1
            } else {
                (selector / 4) as usize % n
            }
        }

        /// A position in region `region % 4` of `file` (anywhere in the file, the records, the
        /// unsynced tail, the last record), scaled by `at`.
        fn pick_offset(&self, file: usize, file_len: usize, region: u8, at: u16) -> usize {
            let (lo, hi) = match region % 4 {
                0 => (0, file_len),
                1 => (
                    SEGMENT_HEADER_SIZE_BYTES,
                    self.used_end(file) + RECORD_HEADER_SIZE_BYTES,
                ),
                2 => (
                    self.durable_end(file),
                    self.used_end(file) + RECORD_HEADER_SIZE_BYTES,
                ),
                _ => (self.last_record_offset(file), self.used_end(file)),
            };
            let off = if hi > lo {
                lo + ((hi - lo) as u64 * at as u64 / u16::MAX as u64) as usize
            } else {
                lo
            };
            off.min(file_len)
        }
    }

    /// What opening the damaged directory must do.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Expected {
        /// The open succeeds; the records from `lost_from` on are gone; `torn` is the cut the open
        /// reports (file index and offset).
        Opens {
            lost_from: Option<Lsn>,
            torn: Option<(usize, u64)>,
            /// A hole of never-acknowledged data was cut with valid records after it up to LSN
            /// `jump_to - 1`: the open writes an LSN-jump checkpoint record with LSN `jump_to`.
            jump_to: Option<Lsn>,
        },
        /// `WalError::Corrupt` naming this file, offset and expected LSN (`None`: not compared).
        Corrupt {
            file: usize,
            offset: u64,
            expected_lsn: Option<Lsn>,
        },
        /// `WalError::NotAWal` naming this file (its magic is gone).
        NotAWal { file: usize },
    }

    /// The model's reading of wal-format.md's "power-cut shape" of a bad record at `o`: its
    /// first 8 bytes (length, type, flags) are zeros, or its length field is in range and one
    /// 512-byte sector's part of its header and payload is all zeros.
    fn zero_shaped(c: &[u8], o: usize) -> bool {
        if all_zero(c, o, o + 8) {
            return true;
        }
        let Some(len) = c.get(o..o + 4) else {
            return false;
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_PAYLOAD_SIZE_BYTES {
            return false;
        }
        let end = (o + RECORD_HEADER_SIZE_BYTES + len).min(c.len());
        let mut start = o;
        while start < end {
            let sector_end = ((start / 512 + 1) * 512).min(end);
            if all_zero(c, start, sector_end) {
                return true;
            }
            start = sector_end;
        }
        false
    }

    /// True when `bytes[from..to]` (clamped to the length) is all zeros. Compares whole chunks
    /// (memcmp), so it stays cheap under the fuzzer's per-comparison instrumentation.
    fn all_zero(bytes: &[u8], from: usize, to: usize) -> bool {
        static ZEROS: [u8; 4096] = [0; 4096];
        let to = to.min(bytes.len());
        from >= to
            || bytes[from..to]
                .chunks(ZEROS.len())
                .all(|c| c == &ZEROS[..c.len()])
    }

    /// A record is intact when its header and payload are present and unchanged and the padding
    /// bytes still in the file are zero.
    fn intact(orig: &[u8], cur: &[u8], r: &SnapRec) -> bool {
        let body_end = r.offset + RECORD_HEADER_SIZE_BYTES + r.payload_len;
        cur.len() >= body_end
            && cur[r.offset..body_end] == orig[r.offset..body_end]
            && all_zero(cur, body_end, r.end())
    }

    /// The header problem of file `i`, if its header bytes changed.
    fn header_problem(snap: &Snapshot, cur: &[Vec<u8>], i: usize) -> Option<Expected> {
        let c = &cur[i];
        let o = &snap.files[i].bytes;
        if c.len() >= SEGMENT_HEADER_SIZE_BYTES
            && c[..SEGMENT_HEADER_SIZE_BYTES] == o[..SEGMENT_HEADER_SIZE_BYTES]
        {
            return None;
        }
        let n = c.len().min(SEGMENT_MAGIC.len());
        if n > 0 && c[..n] != SEGMENT_MAGIC[..n] {
            return Some(Expected::NotAWal { file: i });
        }
        Some(Expected::Corrupt {
            file: i,
            offset: 0,
            expected_lsn: None,
        })
    }

    /// The first problem in scan order (segment by segment, as the read-only inspection reports
    /// it); with `headers_first`, a damaged header anywhere wins (the writable open reads every
    /// header before it scans records).
    fn predict(snap: &Snapshot, cur: &[Vec<u8>], headers_first: bool) -> Expected {
        let n = snap.files.len();
        if headers_first {
            if let Some(e) = (0..n).find_map(|i| header_problem(snap, cur, i)) {
                return e;
            }
        }
        let mut next: Option<Lsn> = None;
        for i in 0..n {
            if let Some(e) = header_problem(snap, cur, i) {
                return e;
            }
            let first = snap.files[i].first_lsn;
            if let Some(want) = next {
                if want != first {
                    return Expected::Corrupt {
                        file: i,
                        offset: 0,
                        expected_lsn: Some(want),
                    };
                }
            }
            let newest = i + 1 == n;
            let (orig, c) = (&snap.files[i].bytes, &cur[i]);
            let recs: Vec<SnapRec> = snap.records_of(i).copied().collect();
            let bad = recs.iter().position(|r| !intact(orig, c, r));
            let Some(k) = bad else {
                let end = snap.used_end(i);
                let expected = recs.last().map_or(first, |r| r.lsn + 1);
                if !newest {
                    if all_zero(c, end, end + RECORD_HEADER_SIZE_BYTES) {
                        next = Some(expected);
                        continue;
                    }
                    return Expected::Corrupt {
                        file: i,
                        offset: end as u64,
                        expected_lsn: Some(expected),
                    };
                }
                let torn = (!all_zero(c, end, c.len())).then_some((i, end as u64));
                return Expected::Opens {
                    lost_from: None,
                    torn,
                    jump_to: None,
                };
            };
            let (o, lsn) = (recs[k].offset, recs[k].lsn);
            let reads_as_end = all_zero(c, o, o + RECORD_HEADER_SIZE_BYTES);
            if !newest {
                if reads_as_end {
                    // The segment simply ends early; the next one then starts at the wrong LSN.
                    next = Some(lsn);
                    continue;
                }
                return Expected::Corrupt {
                    file: i,
                    offset: o as u64,
                    expected_lsn: Some(lsn),
                };
            }
            if reads_as_end && all_zero(c, o, c.len()) {
                return Expected::Opens {
                    lost_from: Some(lsn),
                    torn: None,
                    jump_to: None,
                };
            }
            let after: Vec<&SnapRec> = recs[k + 1..]
                .iter()
                .filter(|r| intact(orig, c, r))
                .collect();
            let mut jump_to = None;
            if !after.is_empty() {
                // A hole followed by valid records is cut only when every one of them was
                // written while no LSN from the hole on was acknowledged durable (their bounds),
                // and the bad record is missing by zeros the way a power cut leaves it.
                let bounds: Option<Vec<Lsn>> = after.iter().map(|r| r.bound).collect();
                let proven = bounds.is_none_or(|b| b.iter().any(|&b| b >= lsn));
                if proven || !zero_shaped(c, o) {
                    return Expected::Corrupt {
                        file: i,
                        offset: o as u64,
                        expected_lsn: Some(lsn),
                    };
                }
                let max_lsn = after.iter().map(|r| r.lsn).max().expect("not empty");
                jump_to = (max_lsn >= lsn).then_some(max_lsn + 1);
            }
            return Expected::Opens {
                lost_from: Some(lsn),
                torn: Some((i, o as u64)),
                jump_to,
            };
        }
        unreachable!("a snapshot always has a newest segment")
    }

    enum Handle {
        Open(Box<Wal>),
        Closed(Snapshot),
    }

    pub(super) struct Run {
        dir: PathBuf,
        model: Model,
        handle: Option<Handle>,
        trace: bool,
        step: usize,
    }

    fn options() -> WalOptions {
        WalOptions::default().segment_size_bytes(MIN_SEGMENT_SIZE_BYTES)
    }

    /// Segment files of `dir` with their first LSNs, in LSN order.
    fn segment_files(dir: &Path) -> Vec<(Lsn, PathBuf)> {
        let mut out: Vec<(Lsn, PathBuf)> = std::fs::read_dir(dir)
            .expect("list scratch dir")
            .filter_map(|e| {
                let e = e.expect("dir entry");
                let lsn = parse_segment_file_name(&e.file_name().to_string_lossy())?;
                Some((lsn, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    fn payload_len(class: u8, seed: u8, i: usize) -> usize {
        let x = seed as usize * 131 + i * 977;
        match class % 8 {
            0..=2 => 1 + x % 64,
            3 | 4 => 1 + x % 2048,
            5 => 8192 + (x * 257) % (MAX_PAYLOAD_SIZE_BYTES - 8192),
            _ => MAX_PAYLOAD_SIZE_BYTES,
        }
    }

    /// A payload that differs per LSN and seed: a fill byte (zero for seeds with bit 7 set, so
    /// zero-filling part of it may leave it intact) with the LSN written at both ends and a marker
    /// every 61 bytes. Built with memset and a short loop, so it stays cheap when instrumented.
    fn payload(lsn: Lsn, seed: u8, len: usize) -> Vec<u8> {
        let sparse = seed & 0x80 != 0;
        let fill = if sparse {
            0
        } else {
            (lsn as u8).wrapping_mul(131).wrapping_add(seed) | 1
        };
        let mut p = vec![fill; len];
        let tag = lsn.to_le_bytes();
        let n = tag.len().min(len);
        p[..n].copy_from_slice(&tag[..n]);
        p[len - n..].copy_from_slice(&tag[..n]);
        for i in (0..len).step_by(61) {
            p[i] ^= seed | 1;
        }
        p
    }

    impl Run {
        pub(super) fn new(dir: &Path, trace: bool) -> Run {
            let wal = Wal::open(dir, options()).expect("open a fresh WAL");
            Run {
                dir: dir.to_path_buf(),
                model: Model::new(),
                handle: Some(Handle::Open(Box::new(wal))),
                trace,
                step: 0,
            }
        }

        fn ctx(&self) -> String {
            format!("op #{}", self.step)
        }

        pub(super) fn apply(&mut self, step: usize, op: Op) {
            self.step = step;
            if self.trace {
                eprintln!("wal_ops #{step}: {op:?}");
            }
            match op {
                Op::Append { count, class, seed } => self.append(count, class, seed),
                Op::Sync => {
                    let wal = self.wal();
                    let durable = wal.sync().expect("sync");
                    assert_eq!(durable, self.model.next_lsn - 1, "{}: sync", self.ctx());
                    self.model.durable_lsn = durable;
                }
                Op::Commit { mode, a, b } => self.commit(mode, a, b),
                Op::Checkpoint => self.checkpoint(),
                Op::CrashCut { segment, how, at } => self.crash_cut(segment, how, at),
                Op::BitFlip {
                    segment,
                    how,
                    at,
                    bit,
                } => self.bit_flip(segment, how, at, bit),
                Op::Reopen => {
                    self.close();
                    self.wal();
                }
            }
            if let Some(Handle::Open(wal)) = &self.handle {
                self.check_cheap(wal);
            }
        }

        pub(super) fn finish(&mut self) {
            self.step = OPS_MAX;
            let wal = self.wal();
            let durable = wal.sync().expect("final sync");
            self.model.durable_lsn = durable;
            self.check_full(true);
            self.close();
            self.wal();
        }

        /// The open WAL, opening (and checking) it first if it is closed.
        fn wal(&mut self) -> &Wal {
            if let Some(Handle::Closed(_)) = self.handle {
                let Some(Handle::Closed(snap)) = self.handle.take() else {
                    unreachable!()
                };
                let damaged = snap.damaged;
                let wal = self.reopen(snap);
                self.handle = Some(Handle::Open(Box::new(wal)));
                // Undamaged, the files are as the drop left them, which `close` inspected already.
                self.check_full(damaged);
            }
            match &self.handle {
                Some(Handle::Open(wal)) => wal,
                _ => unreachable!("opened above"),
            }
        }

        fn check_cheap(&self, wal: &Wal) {
            let m = &self.model;
            let ctx = self.ctx();
            assert_eq!(wal.last_lsn(), m.next_lsn - 1, "{ctx}: last_lsn");
            assert_eq!(wal.durable_lsn(), m.durable_lsn, "{ctx}: durable_lsn");
            assert_eq!(wal.pending_count(), m.pending.len(), "{ctx}: pending count");
            assert_eq!(wal.committed_watermark(), m.watermark(), "{ctx}: watermark");
        }

        /// Everything: pending entries with payloads and, with `on_disk`, every record on disk
        /// against the model.
        fn check_full(&self, on_disk: bool) {
            let Some(Handle::Open(wal)) = &self.handle else {
                unreachable!("checked while open")
            };
            self.check_cheap(wal);
            let ctx = self.ctx();
            let got: Vec<(Lsn, Vec<u8>)> = wal
                .pending()
                .expect("pending")
                .into_iter()
                .map(|e| (e.lsn, e.payload))
                .collect();
            assert!(
                got == self.model.pending_entries(),
                "{ctx}: pending entries differ from the model: got LSNs {:?}, want {:?}",
                got.iter().map(|e| e.0).collect::<Vec<_>>(),
                self.model.pending.iter().collect::<Vec<_>>()
            );
            if !on_disk {
                return;
            }
            let mut on_disk: Vec<(Lsn, RecordType, Vec<u8>)> = Vec::new();
            let view = inspect_with(&self.dir, &mut |_, r| {
                on_disk.push((r.lsn, r.record_type, r.payload.to_vec()))
            })
            .expect("inspect an open WAL");
            assert!(
                view.is_clean(),
                "{ctx}: inspection of an open WAL: {:?}",
                view.problem
            );
            self.check_records(&on_disk);
        }

        /// The records on disk are exactly the model's live records.
        fn check_records(&self, on_disk: &[(Lsn, RecordType, Vec<u8>)]) {
            let ctx = self.ctx();
            let want: Vec<(Lsn, &Rec)> = self
                .model
                .records
                .range(self.model.first_live_lsn..)
                .map(|(l, r)| (*l, r))
                .collect();
            assert_eq!(
                on_disk.iter().map(|r| r.0).collect::<Vec<_>>(),
                want.iter().map(|r| r.0).collect::<Vec<_>>(),
                "{ctx}: the LSNs on disk differ from the model"
            );
            for ((lsn, ty, payload), (_, rec)) in on_disk.iter().zip(&want) {
                assert_eq!(*ty, rec.record_type(), "{ctx}: type of LSN {lsn}");
                assert!(
                    *payload == rec.payload(),
                    "{ctx}: LSN {lsn} ({}) reads back different bytes",
                    ty.name()
                );
            }
        }

        fn append(&mut self, count: usize, class: u8, seed: u8) {
            let ctx = self.ctx();
            // Open first: a reopen after damage may change the next LSN.
            self.wal();
            if class % 8 == 7 {
                let len = if seed & 1 == 0 {
                    0
                } else {
                    MAX_PAYLOAD_SIZE_BYTES + 1
                };
                let bad = vec![0x5a; len];
                let wal = self.wal();
                let single = wal.append(&bad);
                let batch = wal.append_batch(&[&b"ok"[..], &bad[..]]);
                for r in [single.map(|_| ()), batch.map(|_| ())] {
                    match (len, r) {
                        (0, Err(WalError::EmptyPayload)) => {}
                        (_, Err(WalError::RecordTooLarge { size_bytes, .. }))
                            if size_bytes == len => {}
                        (_, other) => panic!("{ctx}: a {len}-byte payload gave {other:?}"),
                    }
                }
                return;
            }
            let lens: Vec<usize> = (0..count).map(|i| payload_len(class, seed, i)).collect();
            let total: usize = lens.iter().sum();
            if self.model.appended_bytes + total > OPS_APPEND_BUDGET_BYTES {
                return;
            }
            let first = self.model.next_lsn;
            let payloads: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| payload(first + i as u64, seed, len))
                .collect();
            let wal = self.wal();
            if count == 1 {
                let lsn = wal.append(&payloads[0]).expect("append");
                assert_eq!(lsn, first, "{ctx}: append LSN");
            } else {
                let range = wal.append_batch(&payloads).expect("append_batch");
                assert_eq!(
                    range,
                    (first, first + count as u64 - 1),
                    "{ctx}: batch LSNs"
                );
            }
            self.model.appended_bytes += total;
            for p in payloads {
                self.model.push(Rec::Entry(p));
            }
        }

        fn commit(&mut self, mode: u8, a: u8, b: u8) {
            let ctx = self.ctx();
            self.wal();
            let m = &self.model;
            let (first, last) = if mode % 4 != 0 {
                if m.durable_lsn == 0 {
                    return;
                }
                let span = m.durable_lsn - 1;
                let x = 1 + a as u64 * span / 255;
                let y = 1 + b as u64 * span / 255;
                (x.min(y), x.max(y))
            } else {
                let limit = m.next_lsn + 2;
                (a as u64 % limit, b as u64 % limit)
            };
            let valid = first >= 1 && first <= last && last <= m.durable_lsn;
            let next = m.next_lsn;
            let wal = self.wal();
            match wal.commit_range(first, last) {
                Ok(marker) => {
                    assert!(valid, "{ctx}: commit {first}..={last} accepted");
                    assert_eq!(marker, next, "{ctx}: marker LSN");
                    self.model.push(Rec::Commit(first, last));
                }
                Err(WalError::InvalidCommit { .. }) => {
                    assert!(!valid, "{ctx}: valid commit {first}..={last} refused")
                }
                Err(e) => panic!("{ctx}: commit {first}..={last}: {e}"),
            }
        }

        fn checkpoint(&mut self) {
            let ctx = self.ctx();
            let before = {
                self.wal();
                segment_files(&self.dir)
            };
            let watermark = self.model.watermark();
            let report = self.wal().checkpoint().expect("checkpoint");
            if self.trace {
                eprintln!("wal_ops {ctx}: checkpoint {report:?}");
            }
            assert_eq!(
                report.committed_watermark, watermark,
                "{ctx}: checkpoint watermark"
            );
            if report.removed.is_empty() {
                return;
            }
            let removed = report.removed.len();
            assert!(
                removed < before.len(),
                "{ctx}: the active segment was removed"
            );
            assert_eq!(
                report.removed,
                before[..removed]
                    .iter()
                    .map(|(_, p)| p.clone())
                    .collect::<Vec<_>>(),
                "{ctx}: a checkpoint removes the oldest segments"
            );
            let first_retained = before[removed].0;
            let m = &self.model;
            assert!(
                m.pending.range(..first_retained).next().is_none(),
                "{ctx}: a segment with pending entries was removed (first retained LSN {first_retained}, pending {:?})",
                m.pending
            );
            assert!(
                m.newest_entry().is_none_or(|l| l >= first_retained),
                "{ctx}: the segment of the newest entry was removed"
            );
            assert!(
                first_retained - 1 <= watermark,
                "{ctx}: removed past the watermark"
            );
            self.model.first_live_lsn = first_retained;
            self.model.push(Rec::Checkpoint(watermark, first_retained));
            // The checkpoint record is synced before the first segment is removed.
            self.model.durable_lsn = self.model.next_lsn - 1;
            let after = segment_files(&self.dir);
            assert_eq!(
                after[0].0, first_retained,
                "{ctx}: files after a checkpoint"
            );
        }

        /// Drops the WAL (like a SIGKILL: its pages stay in the page cache) and takes a snapshot
        /// of the directory, checking it against the model.
        fn close(&mut self) {
            if !matches!(self.handle, Some(Handle::Open(_))) {
                return;
            }
            let Some(Handle::Open(wal)) = self.handle.take() else {
                unreachable!("checked above")
            };
            drop(wal);
            let ctx = self.ctx();
            let files: Vec<SnapFile> = segment_files(&self.dir)
                .into_iter()
                .map(|(first_lsn, path)| SnapFile {
                    bytes: std::fs::read(&path).expect("read segment"),
                    path,
                    first_lsn,
                })
                .collect();
            // The layout, read with the format decoders directly (a full inspection would also
            // scan every zero tail, which is slow under the fuzzer's instrumentation; the open
            // that follows verifies all of it anyway).
            let mut records = Vec::new();
            let mut on_disk = Vec::new();
            for (file, f) in files.iter().enumerate() {
                let header = SegmentHeader::decode(&f.bytes)
                    .unwrap_or_else(|e| panic!("{ctx}: {} after a drop: {e}", f.path.display()));
                let hasher = header.record_hasher();
                let mut offset = SEGMENT_HEADER_SIZE_BYTES;
                loop {
                    match decode_record(&f.bytes, offset, &hasher) {
                        Decoded::Record(r) => {
                            if header.version >= 2 && !r.meta.lsn_jump {
                                let bound = r.meta.durable_bound.unwrap_or_else(|| {
                                    panic!("{ctx}: LSN {} has no durable bound", r.lsn)
                                });
                                let floor = self.model.bound_floor.get(&r.lsn).copied();
                                assert!(
                                    bound < r.lsn && floor.is_none_or(|f| bound >= f),
                                    "{ctx}: LSN {} carries durable bound {bound}; the model knew LSN {floor:?} durable when it was appended",
                                    r.lsn
                                );
                            }
                            records.push(SnapRec {
                                file,
                                offset,
                                payload_len: r.payload.len(),
                                lsn: r.lsn,
                                bound: r.meta.durable_bound,
                            });
                            on_disk.push((r.lsn, r.record_type, r.payload.to_vec()));
                            offset += r.size_bytes;
                        }
                        Decoded::End => break,
                        Decoded::Invalid(e) => panic!(
                            "{ctx}: {} at offset {offset} after a drop: {e}",
                            f.path.display()
                        ),
                    }
                }
            }
            self.check_records(&on_disk);
            self.handle = Some(Handle::Closed(Snapshot {
                files,
                records,
                durable_lsn: self.model.durable_lsn,
                crash_only: true,
                damaged: false,
            }));
        }

        fn snapshot(&mut self) -> &mut Snapshot {
            self.close();
            match &mut self.handle {
                Some(Handle::Closed(snap)) => snap,
                _ => unreachable!("closed above"),
            }
        }

        fn crash_cut(&mut self, segment: u8, how: u8, at: u16) {
            let snap = self.snapshot();
            let file = snap.pick_file(segment);
            let path = snap.files[file].path.clone();
            let mut bytes = std::fs::read(&path).expect("read segment");
            let off = snap.pick_offset(file, bytes.len(), how >> 1, at);
            let newest = file + 1 == snap.files.len();
            snap.crash_only &= newest && off >= snap.durable_end(file);
            snap.damaged = true;
            if how & 1 == 0 {
                bytes.truncate(off);
            } else {
                bytes[off..].fill(0);
            }
            std::fs::write(&path, &bytes).expect("write damaged segment");
        }

        fn bit_flip(&mut self, segment: u8, how: u8, at: u16, bit: u8) {
            let snap = self.snapshot();
            let file = snap.pick_file(segment);
            let path = snap.files[file].path.clone();
            let mut bytes = std::fs::read(&path).expect("read segment");
            if bytes.is_empty() {
                return;
            }
            let off = snap
                .pick_offset(file, bytes.len(), how, at)
                .min(bytes.len() - 1);
            snap.damaged = true;
            if how & 8 != 0 {
                // A sector that never reached the disk: zeros (segments are preallocated with
                // zeros and never rewritten). In the newest segment's unsynced region that is
                // what a power cut does, and must never fail the open.
                let start = off - off % 512;
                let end = (start + 512).min(bytes.len());
                let newest = file + 1 == snap.files.len();
                snap.crash_only &= newest && start >= snap.durable_end(file);
                bytes[start..end].fill(0);
            } else {
                snap.crash_only = false;
                bytes[off] ^= 1 << (bit % 8);
            }
            std::fs::write(&path, &bytes).expect("write damaged segment");
        }

        /// Opens the closed WAL, checking the outcome against the prediction from the bytes.
        fn reopen(&mut self, snap: Snapshot) -> Wal {
            let ctx = self.ctx();
            let cur: Vec<Vec<u8>> = snap
                .files
                .iter()
                .map(|f| std::fs::read(&f.path).expect("read segment"))
                .collect();
            let expect_open = predict(&snap, &cur, true);
            let expect_view = predict(&snap, &cur, false);
            if self.trace {
                eprintln!("wal_ops {ctx}: expecting {expect_open:?} (inspection: {expect_view:?})");
            }
            if snap.damaged {
                self.check_inspection(&snap, &expect_view);
            }
            let opened = Wal::open(&self.dir, options());
            let path_of = |file: usize| snap.files[file].path.clone();
            match (&expect_open, opened) {
                (
                    Expected::Opens {
                        lost_from,
                        torn,
                        jump_to,
                    },
                    Ok(wal),
                ) => {
                    let report = wal.open_report();
                    let got = report
                        .torn_tail
                        .as_ref()
                        .map(|t| (t.path.clone(), t.offset));
                    let want = torn.map(|(f, o)| (path_of(f), o));
                    assert_eq!(got, want, "{ctx}: torn tail reported by the open");
                    if let Some(lost) = lost_from {
                        if snap.crash_only {
                            assert!(
                                *lost > snap.durable_lsn,
                                "{ctx}: a crash lost synced LSN {lost} (durable up to {})",
                                snap.durable_lsn
                            );
                        }
                        self.model.lose_from(*lost);
                    }
                    if let Some(jump_to) = jump_to {
                        let m = &mut self.model;
                        assert!(*jump_to > m.next_lsn, "{ctx}: a jump goes forward");
                        // The jump record restates the watermark as it stood at the cut (the
                        // WAL computes it before the jump), then takes the LSN after the jump.
                        let checkpoint = Rec::Checkpoint(m.watermark(), m.first_live_lsn);
                        m.next_lsn = *jump_to;
                        m.push(checkpoint);
                    }
                    self.model.durable_lsn = self.model.next_lsn - 1;
                    wal
                }
                (expected, Ok(_)) => {
                    panic!("{ctx}: expected {expected:?}, but the WAL opened")
                }
                (expected, Err(err)) => {
                    assert!(
                        !snap.crash_only,
                        "{ctx}: a crash (cut at or after the durable end) made the open fail: {err}"
                    );
                    match (expected, &err) {
                        (
                            Expected::Corrupt {
                                file,
                                offset,
                                expected_lsn,
                            },
                            WalError::Corrupt {
                                path,
                                offset: got_offset,
                                expected_lsn: got_lsn,
                                ..
                            },
                        ) => {
                            assert_eq!(*path, path_of(*file), "{ctx}: corrupt file ({err})");
                            assert_eq!(got_offset, offset, "{ctx}: corrupt offset ({err})");
                            if let Some(lsn) = expected_lsn {
                                assert_eq!(got_lsn, lsn, "{ctx}: expected LSN ({err})");
                            }
                        }
                        (Expected::NotAWal { file }, WalError::NotAWal { path, .. }) => {
                            assert_eq!(*path, path_of(*file), "{ctx}: foreign file ({err})");
                        }
                        (expected, _) => panic!("{ctx}: expected {expected:?}, got {err}"),
                    }
                    for (f, c) in snap.files.iter().zip(&cur) {
                        let now = std::fs::read(&f.path).expect("read segment");
                        assert!(
                            now == *c,
                            "{ctx}: a failed open changed {}",
                            f.path.display()
                        );
                    }
                    // Put the bytes back as they were at the drop and go on from there.
                    for f in &snap.files {
                        std::fs::write(&f.path, &f.bytes).expect("restore segment");
                    }
                    let wal = Wal::open(&self.dir, options())
                        .unwrap_or_else(|e| panic!("{ctx}: reopening the restored WAL: {e}"));
                    assert!(
                        wal.open_report().torn_tail.is_none(),
                        "{ctx}: the restored WAL had a torn tail"
                    );
                    self.model.durable_lsn = self.model.next_lsn - 1;
                    wal
                }
            }
        }

        /// The read-only inspection of the damaged directory reports the predicted problem.
        fn check_inspection(&self, snap: &Snapshot, expected: &Expected) {
            let ctx = self.ctx();
            let view = inspect(&self.dir).expect("inspect a damaged WAL");
            let path_of = |file: usize| snap.files[file].path.clone();
            match (expected, &view.problem) {
                (Expected::Opens { torn: None, .. }, None) => {}
                (
                    Expected::Opens {
                        torn: Some((f, o)), ..
                    },
                    Some((p, TailState::Torn { offset, .. })),
                ) if *p == path_of(*f) && offset == o => {}
                (
                    Expected::Corrupt {
                        file,
                        offset,
                        expected_lsn,
                    },
                    Some((
                        p,
                        TailState::Corrupt {
                            offset: got_offset,
                            expected_lsn: got_lsn,
                            ..
                        },
                    )),
                ) if *p == path_of(*file)
                    && got_offset == offset
                    && expected_lsn.is_none_or(|l| l == *got_lsn) => {}
                (Expected::NotAWal { file }, Some((p, TailState::Corrupt { offset: 0, .. })))
                    if *p == path_of(*file) => {}
                (expected, got) => {
                    panic!("{ctx}: inspection found {got:?}, expected {expected:?}")
                }
            }
        }
    }
}
