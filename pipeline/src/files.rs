//! Local files written without trusting what is already on disk: a pull, a decode or a state
//! save never writes through a link someone planted, and never leaves a partial file under
//! a final name.

use std::io;
use std::path::Path;

/// Writes `bytes` to `dest` through a new file in `tmp_dir` (created exclusively, so never
/// through a planted link) renamed over it (a rename replaces a link, never follows it).
/// `tmp_dir` must be on the same file system as `dest`.
pub fn write_replace(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".shardrop-write-")
        .tempfile_in(tmp_dir)?;
    io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

/// `write_replace` with the temporary file beside `dest`.
pub fn write_replace_beside(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    write_replace(dir, dest, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_a_planted_link_without_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let dest = dir.path().join("out");
        std::os::unix::fs::symlink(&victim, &dest).unwrap();
        write_replace_beside(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&dest).unwrap().is_file());
    }
}
