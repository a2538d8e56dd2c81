//! Writing an output file (`--logits-out`, chat `/save`) whole, and only where the user meant.
//!
//! Notable:
//! - A regular file (or a new one) is written under a temporary name in the same folder and
//!   renamed over the target, so a failure never leaves half a file; a replaced file keeps its
//!   permissions, a new one gets the umask's, as any tool's output would.
//! - Anything else is written through, never replaced: a symlink is followed to the file it
//!   names (the link stays), and a FIFO or a device (`/dev/null`, `/dev/stdout`) is opened
//!   and written, so `--logits-out /dev/null` run as root cannot delete `/dev/null`.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Write `path` by calling `write(p)` with the path to write to: a temporary sibling renamed
/// over `path`, or `path` itself when it is a FIFO or a device.
pub fn write_whole(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|e| {
            anyhow!(
                "{} is a symbolic link to a file that cannot be reached: {e}",
                path.display()
            )
        })?,
        _ => path.to_path_buf(),
    };
    let meta = match std::fs::metadata(&target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
    };
    match meta {
        Some(m) if m.is_dir() => bail!("cannot write {}: it is a folder", path.display()),
        // A FIFO, a device, a socket: written in place, never renamed over.
        Some(m) if !m.is_file() => {
            write(&target).with_context(|| format!("cannot write {}", path.display()))
        }
        existing => {
            let tmp = temp_sibling(&target);
            let result = write(&tmp).and_then(|()| {
                if let Some(m) = &existing {
                    std::fs::set_permissions(&tmp, m.permissions())?;
                }
                std::fs::rename(&tmp, &target)?;
                Ok(())
            });
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result.with_context(|| format!("cannot write {}", path.display()))
        }
    }
}

/// `<dir>/.<name>.partial-<pid>`: hidden, in the same folder (a rename never crosses disks).
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn put(p: &Path, text: &str) -> Result<()> {
        std::fs::write(p, text).map_err(Into::into)
    }

    #[test]
    fn new_and_replaced_files_are_whole_and_keep_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_whole(&p, |t| put(t, "one")).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_whole(&p, |t| put(t, "two")).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // A failed write leaves the old file and no temporary.
        let e = write_whole(&p, |t| {
            put(t, "half")?;
            bail!("disk full")
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn links_fifos_and_devices_are_written_through_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.txt");
        std::fs::write(&real, "old").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_whole(&link, |t| put(t, "new")).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new");

        let null = Path::new("/dev/null");
        write_whole(null, |t| {
            assert_eq!(t, null);
            put(t, "gone")
        })
        .unwrap();
        assert!(!std::fs::metadata(null).unwrap().is_file());

        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
        };
        write_whole(&fifo, |t| put(t, "through")).unwrap();
        assert_eq!(reader.join().unwrap(), "through");
        assert!(!std::fs::metadata(&fifo).unwrap().is_file());
        assert!(write_whole(dir.path(), |t| put(t, "x")).is_err());
    }
}
