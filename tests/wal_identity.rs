//! WAL identity (format version 2, segment header bytes 40..56): the `wal_id` is the same in
//! every segment and survives reopen and rolls, `rebind` changes the owner durably, a segment of
//! another WAL is refused, and a version 1 segment (no identity) still opens and reads.

mod common;

use std::path::Path;

use common::*;
use settlement_wal::wal::format::{
    encode_record, segment_file_name, RecordType, SegmentHeader, FORMAT_VERSION,
    MIN_SEGMENT_SIZE_BYTES,
};
use settlement_wal::wal::{inspect, Wal, WalError, WalIdentity, WalOptions};

const IDENTITY: WalIdentity = WalIdentity {
    wal_id: 0x00c0_ffee_0000_0001,
    owner_id: 7,
};

fn header_of(path: &Path) -> SegmentHeader {
    SegmentHeader::decode(&std::fs::read(path).unwrap()).unwrap()
}

/// Appends enough 1 KiB entries to fill about `segments` small segments.
fn fill_segments(wal: &Wal, segments: usize) {
    // 1,048 bytes on disk each: 251 do not fit in one 256 KiB segment.
    let entries = segments * (SMALL_SEGMENT_BYTES as usize / 1048 + 1) + 1;
    for i in 0..entries {
        wal.append(&[(i % 251) as u8 | 1; 1024]).unwrap();
    }
    wal.sync().unwrap();
}

#[test]
fn a_new_wal_gets_a_random_non_zero_wal_id_and_owner_0() {
    let a = temp_dir();
    let b = temp_dir();
    let wal_a = open_small(a.path());
    let wal_b = open_small(b.path());
    let id_a = wal_a.identity().expect("a new WAL has an identity");
    let id_b = wal_b.identity().expect("a new WAL has an identity");
    assert_ne!(id_a.wal_id, 0);
    assert_eq!(id_a.owner_id, 0);
    assert_ne!(id_a.wal_id, id_b.wal_id, "two WALs drew the same wal_id");
    let seg = &segment_files(a.path())[0];
    let header = header_of(seg);
    assert_eq!(header.version, FORMAT_VERSION);
    assert_eq!(header.identity, Some(id_a));
}

#[test]
fn the_identity_survives_reopen_and_rolls_and_the_options_do_not_override_it() {
    let dir = temp_dir();
    {
        let wal = Wal::open(dir.path(), small_options().identity(IDENTITY)).unwrap();
        assert_eq!(wal.identity(), Some(IDENTITY));
        fill_segments(&wal, 3);
    }
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    for s in &segs {
        assert_eq!(header_of(s).identity, Some(IDENTITY), "{}", s.display());
    }
    // Another identity in the options is ignored: the directory already has one.
    let other = WalIdentity {
        wal_id: 99,
        owner_id: 1,
    };
    let wal = Wal::open(dir.path(), small_options().identity(other)).unwrap();
    assert_eq!(wal.identity(), Some(IDENTITY));
    fill_segments(&wal, 1);
    drop(wal);
    for s in &segment_files(dir.path()) {
        assert_eq!(header_of(s).identity, Some(IDENTITY), "{}", s.display());
    }
    let view = inspect(dir.path()).unwrap();
    assert_eq!(view.identity, Some(IDENTITY));
    assert!(view
        .segments
        .iter()
        .all(|s| s.identity == Some(IDENTITY) && s.format_version == Some(FORMAT_VERSION)));
}

#[test]
fn rebind_seals_the_active_segment_and_later_segments_carry_the_new_owner() {
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), small_options().identity(IDENTITY)).unwrap();
    let first = wal.append(b"before the rebind").unwrap();
    let before = segment_files(dir.path());
    assert_eq!(before.len(), 1);
    let bound = wal.rebind(1234).unwrap();
    assert_eq!(
        bound,
        WalIdentity {
            wal_id: IDENTITY.wal_id,
            owner_id: 1234
        }
    );
    assert_eq!(wal.identity(), Some(bound));
    let after = segment_files(dir.path());
    assert_eq!(after.len(), 2, "a rebind starts a new segment");
    assert_eq!(header_of(&after[0]).identity, Some(IDENTITY));
    assert_eq!(header_of(&after[1]).identity, Some(bound));
    assert_eq!(
        after[1].file_name().unwrap().to_string_lossy(),
        segment_file_name(first + 1)
    );
    // The same owner again changes nothing.
    assert_eq!(wal.rebind(1234).unwrap(), bound);
    assert_eq!(segment_files(dir.path()).len(), 2);
    // Rebinding an active segment without records replaces it (same name, new owner).
    let again = wal.rebind(5).unwrap();
    assert_eq!(again.owner_id, 5);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2);
    assert_eq!(header_of(&files[1]).identity, Some(again));
    let second = wal.append(b"after the rebind").unwrap();
    assert_eq!(second, first + 1);
    // Rolls keep the new owner.
    fill_segments(&wal, 2);
    drop(wal);
    let files = segment_files(dir.path());
    for f in &files[1..] {
        assert_eq!(header_of(f).identity, Some(again), "{}", f.display());
    }
    let wal = open_small(dir.path());
    assert_eq!(
        wal.identity(),
        Some(again),
        "the newest segment's owner wins"
    );
    let pending: Vec<_> = wal.pending().unwrap();
    assert_eq!(pending[0].payload, b"before the rebind");
    assert_eq!(pending[1].payload, b"after the rebind");
    assert_eq!(inspect(dir.path()).unwrap().identity, Some(again));
}

#[test]
fn rebind_is_durable_when_it_returns() {
    // The new segment's header and directory entry are fsynced before rebind returns: a
    // recording file system sees the file sync and the directory sync inside the call.
    use settlement_wal::wal::fs::{OsFs, WalFs};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Debug, Default)]
    struct Counting {
        file_syncs: AtomicUsize,
        dir_syncs: AtomicUsize,
    }
    impl WalFs for Counting {
        fn allocate(&self, f: &std::fs::File, p: &Path, n: u64) -> std::io::Result<()> {
            OsFs.allocate(f, p, n)
        }
        fn write_at(
            &self,
            f: &std::fs::File,
            p: &Path,
            b: &[u8],
            o: u64,
        ) -> std::io::Result<usize> {
            OsFs.write_at(f, p, b, o)
        }
        fn read_at(
            &self,
            f: &std::fs::File,
            p: &Path,
            b: &mut [u8],
            o: u64,
        ) -> std::io::Result<usize> {
            OsFs.read_at(f, p, b, o)
        }
        fn sync_file(&self, f: &std::fs::File, p: &Path) -> std::io::Result<()> {
            self.file_syncs.fetch_add(1, Ordering::SeqCst);
            OsFs.sync_file(f, p)
        }
        fn sync_range(
            &self,
            m: &memmap2::MmapRaw,
            p: &Path,
            o: usize,
            l: usize,
        ) -> std::io::Result<()> {
            OsFs.sync_range(m, p, o, l)
        }
        fn sync_dir(&self, d: &Path) -> std::io::Result<()> {
            self.dir_syncs.fetch_add(1, Ordering::SeqCst);
            OsFs.sync_dir(d)
        }
    }
    let dir = temp_dir();
    let fs = Arc::new(Counting::default());
    let wal = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap();
    wal.append(b"x").unwrap();
    let (files, dirs) = (
        fs.file_syncs.load(Ordering::SeqCst),
        fs.dir_syncs.load(Ordering::SeqCst),
    );
    wal.rebind(3).unwrap();
    assert!(fs.file_syncs.load(Ordering::SeqCst) > files);
    assert!(fs.dir_syncs.load(Ordering::SeqCst) > dirs);
}

#[test]
fn a_segment_of_another_wal_is_refused_naming_the_file_and_both_ids() {
    let ours = temp_dir();
    let theirs = temp_dir();
    {
        let wal = Wal::open(ours.path(), small_options().identity(IDENTITY)).unwrap();
        fill_segments(&wal, 1);
    }
    let other = WalIdentity {
        wal_id: 0xbad0_0000_0000_0bad,
        owner_id: 7,
    };
    let next_first_lsn = {
        let wal = Wal::open(ours.path(), small_options()).unwrap();
        wal.last_lsn() + 1
    };
    {
        // A WAL of its own whose segment has the name (and LSN) ours would use next.
        let wal = Wal::open(
            theirs.path(),
            small_options().identity(other).first_lsn(next_first_lsn),
        )
        .unwrap();
        wal.append(b"a record of another WAL").unwrap();
        wal.sync().unwrap();
    }
    let foreign = segment_files(theirs.path()).remove(0);
    let copied = ours.path().join(foreign.file_name().unwrap());
    std::fs::copy(&foreign, &copied).unwrap();
    let before: Vec<Vec<u8>> = segment_files(ours.path())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let err = Wal::open(ours.path(), small_options()).unwrap_err();
    match &err {
        WalError::ForeignSegment {
            path,
            found_wal_id,
            expected_wal_id,
            reference,
        } => {
            assert_eq!(*path, copied);
            assert_eq!(*found_wal_id, other.wal_id);
            assert_eq!(*expected_wal_id, IDENTITY.wal_id);
            assert_eq!(*reference, segment_files(ours.path())[0]);
        }
        other => panic!("expected ForeignSegment, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&copied.display().to_string()), "{text}");
    assert!(text.contains("0xbad0000000000bad"), "{text}");
    assert!(text.contains("0x00c0ffee00000001"), "{text}");
    assert!(text.contains("move the file"), "{text}");
    let after: Vec<Vec<u8>> = segment_files(ours.path())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(before == after, "a refused open changed a file");
    // The read-only view reports it as the problem and keeps the WAL's identity.
    let view = inspect(ours.path()).unwrap();
    let (path, _) = view
        .problem
        .clone()
        .expect("the foreign segment is a problem");
    assert_eq!(path, copied);
    assert_eq!(view.identity.map(|i| i.wal_id), Some(IDENTITY.wal_id));
    // Moving it out is the fix.
    std::fs::remove_file(&copied).unwrap();
    let wal = Wal::open(ours.path(), small_options()).unwrap();
    assert_eq!(wal.identity(), Some(IDENTITY));
}

/// A version 1 segment as an older build wrote it: reserved bytes 40..60 zero.
fn write_v1_segment(dir: &Path, payloads: &[&[u8]]) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let header = SegmentHeader::v1(1, 0x5eed_5eed_5eed_5eed, MIN_SEGMENT_SIZE_BYTES);
    let mut bytes = header.encode().to_vec();
    assert_eq!(&bytes[8..12], &[1, 0, 0, 0], "version 1");
    assert!(bytes[40..60].iter().all(|&b| b == 0));
    let hasher = header.record_hasher();
    for (i, p) in payloads.iter().enumerate() {
        bytes.extend(encode_record(&hasher, RecordType::Entry, i as u64 + 1, p));
    }
    bytes.resize(MIN_SEGMENT_SIZE_BYTES as usize, 0);
    let path = dir.join(segment_file_name(1));
    std::fs::write(&path, &bytes).unwrap();
    path
}

#[test]
fn a_hand_built_version_1_segment_still_opens_and_reads() {
    let dir = temp_dir();
    let v1 = write_v1_segment(dir.path(), &[b"old one", b"old two"]);
    let view = inspect(dir.path()).unwrap();
    assert!(view.is_clean(), "{:?}", view.problem);
    assert_eq!(view.identity, None);
    assert_eq!(view.segments[0].format_version, Some(1));
    let wal = Wal::open(dir.path(), small_options().identity(IDENTITY)).unwrap();
    assert_eq!(
        wal.identity(),
        None,
        "a version 1 directory has no identity"
    );
    let pending = wal.pending().unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].payload, b"old one");
    assert_eq!(pending[1].payload, b"old two");
    // New records go on in the version 1 segment; the next segment is version 2 with the
    // options' identity.
    let lsn = wal.append(b"new").unwrap();
    assert_eq!(lsn, 3);
    wal.sync().unwrap();
    fill_segments(&wal, 1);
    assert_eq!(wal.identity(), Some(IDENTITY));
    drop(wal);
    let files = segment_files(dir.path());
    assert_eq!(files[0], v1);
    assert_eq!(header_of(&files[0]).version, 1);
    for f in &files[1..] {
        let h = header_of(f);
        assert_eq!((h.version, h.identity), (FORMAT_VERSION, Some(IDENTITY)));
    }
    let wal = open_small(dir.path());
    assert_eq!(wal.identity(), Some(IDENTITY));
    assert_eq!(wal.pending().unwrap()[2].payload, b"new");
}

#[test]
fn rebind_of_a_version_1_wal_starts_its_first_version_2_segment() {
    let dir = temp_dir();
    write_v1_segment(dir.path(), &[b"old"]);
    let wal = open_small(dir.path());
    assert_eq!(wal.identity(), None);
    let id = wal.rebind(77).unwrap();
    assert_ne!(id.wal_id, 0);
    assert_eq!(id.owner_id, 77);
    drop(wal);
    let wal = open_small(dir.path());
    assert_eq!(wal.identity(), Some(id));
    assert_eq!(wal.pending().unwrap()[0].payload, b"old");
}

#[test]
fn a_version_1_header_with_non_zero_reserved_bytes_is_a_bad_header() {
    let dir = temp_dir();
    let path = write_v1_segment(dir.path(), &[b"x"]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[44] = 1;
    let crc = crc32fast::hash(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = Wal::open(dir.path(), small_options()).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { offset: 0, reason, .. } if reason.contains("reserved bytes 40..60")),
        "{err}"
    );
}

#[test]
fn version_2_headers_with_wal_id_0_or_non_zero_reserved_bytes_are_bad_headers() {
    for (at, what) in [(40..48, "wal_id"), (56..57, "reserved bytes 56..60")] {
        let dir = temp_dir();
        {
            let wal = open_small(dir.path());
            wal.append(b"x").unwrap();
            wal.sync().unwrap();
        }
        let path = segment_files(dir.path()).remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let fill = if what == "wal_id" { 0 } else { 1 };
        bytes[at].fill(fill);
        let crc = crc32fast::hash(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = Wal::open(dir.path(), small_options()).unwrap_err();
        assert!(
            matches!(&err, WalError::Corrupt { offset: 0, reason, .. } if reason.contains(what)),
            "{what}: {err}"
        );
    }
}

#[test]
fn an_identity_with_wal_id_0_is_an_invalid_option() {
    let dir = temp_dir();
    let err = Wal::open(
        dir.path(),
        WalOptions::default().identity(WalIdentity {
            wal_id: 0,
            owner_id: 1,
        }),
    )
    .unwrap_err();
    assert!(matches!(err, WalError::InvalidOptions(_)), "{err:?}");
}
