//! The decision log file (`log.decisions_file`), followed across rotation: when the path no
//! longer names the file being written (logrotate's default moves it away and expects the
//! writer to create a new one; a removed file the same), the next batch goes to a newly
//! created file at the path. The check is one `stat` at most every [`CHECK_EVERY`], before a
//! batch: lines written meanwhile go to the moved file, as logrotate expects (its
//! `delaycompress`). `copytruncate` works as it is: the file is opened for appending.

use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{TelemetryError, open_append};

/// How often the path is checked for a rotation.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The identity of a file: device and inode.
type FileId = (u64, u64);

fn file_id(meta: &std::fs::Metadata) -> FileId {
    (meta.dev(), meta.ino())
}

pub(super) struct LogFile {
    path: PathBuf,
    file: File,
    id: FileId,
    check_every: Duration,
    checked: Instant,
    /// A reopen failed (and was said on stderr); said again only after one succeeded.
    failing: bool,
}

impl LogFile {
    pub(super) fn open(path: &Path, check_every: Duration) -> Result<Self, TelemetryError> {
        let file = open_append(path)?;
        let id =
            file.metadata()
                .map(|m| file_id(&m))
                .map_err(|source| TelemetryError::OpenFile {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            id,
            check_every,
            checked: Instant::now(),
            failing: false,
        })
    }

    /// Reopens the path when it names another file than the one being written, or none.
    fn follow_rotation(&mut self) {
        if self.checked.elapsed() < self.check_every {
            return;
        }
        self.checked = Instant::now();
        if std::fs::metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id) {
            return;
        }
        match Self::open(&self.path, self.check_every) {
            Ok(new) => {
                *self = new;
            }
            // Lines keep going to the file already open (moved or removed, it still takes
            // them): nothing is lost; the reopen is tried again at the next check.
            Err(err) => {
                if !self.failing {
                    eprintln!(
                        "error: the decision log file was moved or removed and cannot be created \
                         again: {}; writing on to the old one",
                        crate::cli::error_chain(&err)
                    );
                }
                self.failing = true;
            }
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.follow_rotation();
        self.file.write(buf)
    }

    /// One check for the whole batch, and one `write_all` to the file: a batch is never split
    /// between the old file and the new one.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.follow_rotation();
        self.file.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_moved_or_removed_file_is_created_again_and_nothing_is_lost() {
        let dir =
            Dir(std::env::temp_dir().join(format!("nodegate-logfile-{}", std::process::id())));
        let path = dir.0.join("decisions.log");
        let mut log = LogFile::open(&path, Duration::ZERO).unwrap();
        log.write_all(b"1\n").unwrap();
        // logrotate's default: moved away, the writer creates the next one.
        let moved = dir.0.join("decisions.log.1");
        std::fs::rename(&path, &moved).unwrap();
        log.write_all(b"2\n").unwrap();
        log.write_all(b"3\n").unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "1\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\n3\n");
        // Removed: created again.
        std::fs::remove_file(&path).unwrap();
        log.write_all(b"4\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "4\n");
        // copytruncate: appending goes on at the new end.
        std::fs::write(&path, "").unwrap();
        log.write_all(b"5\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "5\n");
    }

    #[test]
    fn between_checks_lines_go_to_the_moved_file() {
        let dir =
            Dir(std::env::temp_dir().join(format!("nodegate-logfile-slow-{}", std::process::id())));
        let path = dir.0.join("decisions.log");
        let mut log = LogFile::open(&path, Duration::from_secs(3600)).unwrap();
        let moved = dir.0.join("decisions.log.1");
        std::fs::rename(&path, &moved).unwrap();
        log.write_all(b"1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "1\n");
        assert!(!path.exists());
    }

    #[test]
    fn a_path_that_cannot_be_created_again_keeps_the_old_file() {
        let dir =
            Dir(std::env::temp_dir().join(format!("nodegate-logfile-gone-{}", std::process::id())));
        let path = dir.0.join("sub").join("decisions.log");
        let mut log = LogFile::open(&path, Duration::ZERO).unwrap();
        let moved = dir.0.join("decisions.log.1");
        std::fs::rename(&path, &moved).unwrap();
        // The directory becomes a file: the path cannot be created again.
        std::fs::remove_dir(dir.0.join("sub")).unwrap();
        std::fs::write(dir.0.join("sub"), "").unwrap();
        log.write_all(b"1\n").unwrap();
        assert!(log.failing);
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "1\n");
    }
}
