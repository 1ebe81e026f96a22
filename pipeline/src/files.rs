//! Local files written without trusting what is already on disk: a pull, a decode or a state
//! save never writes through a link someone planted, and never leaves a partial file under
//! a final name.

use std::io;
use std::path::Path;

/// Writes `bytes` to `dest` through a new file in `tmp_dir` (created exclusively, so never
/// through a planted link) renamed over it (a rename replaces a link, never follows it).
/// `tmp_dir` must be on the same file system as `dest`. The file gets the mode a plain write
/// would leave: an existing regular file's own, else `0666` less the umask (a temporary file
/// is created `0600`, which would make a rewritten state file or model unreadable to the
/// group that read it before).
pub fn write_replace(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = tempfile::Builder::new()
        .prefix(".shardrop-write-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(tmp_dir)?;
    if let Ok(m) = std::fs::symlink_metadata(dest)
        && m.is_file()
    {
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(
                m.permissions().mode() & 0o7777,
            ))?;
    }
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

/// Opens a local file that must be a regular file of at most `max` bytes, without following
/// a link at its name (`O_NOFOLLOW`) and without blocking on a FIFO (`O_NONBLOCK` while
/// opening): a planted link to `/dev/zero`, a FIFO or an 8 GiB file is refused before
/// anything is read. Returns the file and its length; the error names what was found.
pub fn open_regular(path: &Path, max: u64) -> io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other("a symbolic link (refused: not followed)"),
            _ => e,
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!(
            "not a regular file ({:?})",
            meta.file_type()
        )));
    }
    if meta.len() > max {
        return Err(io::Error::other(format!(
            "{} bytes, over the {max} this file may have",
            meta.len()
        )));
    }
    Ok((file, meta.len()))
}

/// Reads a whole file that [`open_regular`] accepts, never more than `max` bytes even if it
/// grows while read.
pub(crate) fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(path, max)?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len as usize).map_err(|_| {
        io::Error::other(format!("{len} bytes: more than this machine can allocate"))
    })?;
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::other(format!(
            "grew past {max} bytes while read"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_keeps_its_mode_and_a_new_one_gets_the_umasks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let kept = dir.path().join("kept");
        std::fs::write(&kept, b"old").unwrap();
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_replace_beside(&kept, b"new").unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), b"new");
        assert_eq!(mode(&kept), 0o640);
        // A new file: what a plain write under the same umask gives (never 0600 by itself).
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let new = dir.path().join("new");
        write_replace_beside(&new, b"x").unwrap();
        assert_eq!(mode(&new), mode(&plain));
    }

    #[test]
    fn reads_only_bounded_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, b"12345").unwrap();
        assert_eq!(read_regular(&ok, 5).unwrap(), b"12345");
        let e = read_regular(&ok, 4).unwrap_err().to_string();
        assert!(e.contains("over the 4"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_regular(&link, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_regular(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

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
