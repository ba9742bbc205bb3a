//! Replays the committed fuzz corpus (`fuzz/corpus/`) through the same code paths as the
//! cargo-fuzz targets, on the stable toolchain, in every `cargo test`.

mod common;

use std::path::Path;

use settlement_wal::wal::fuzzing::{decode_arbitrary, scan_arbitrary_segment};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the {target} corpus is empty");
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn wal_decode_corpus_replays_without_panics() {
    for (name, data) in corpus("wal_decode") {
        eprintln!("{name}");
        decode_arbitrary(&data);
    }
}

#[test]
fn wal_scan_corpus_replays_without_panics() {
    let scratch = common::temp_dir();
    for (name, data) in corpus("wal_scan") {
        eprintln!("{name}");
        scan_arbitrary_segment(&data, &scratch.path().join("wal"));
    }
}
