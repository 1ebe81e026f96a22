//! Committed golden vectors: `SHARDROP_BLESS=1` rewrites them, every other run requires the
//! build to produce exactly the committed bytes.
#![allow(dead_code)]

use std::path::Path;

/// Whether this run rewrites the vectors (`SHARDROP_BLESS=1`).
pub fn bless() -> bool {
    std::env::var("SHARDROP_BLESS").is_ok_and(|v| v == "1")
}

/// Writes `bytes` when blessing, then requires the committed file to hold exactly them.
pub fn check(path: &Path, bytes: &[u8]) {
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let stored = std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e} (SHARDROP_BLESS=1 once)", path.display()));
    assert!(
        stored == bytes,
        "{}: this build produces different bytes",
        path.display()
    );
}
