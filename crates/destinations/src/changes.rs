//! Waiting for the destinations file to change without waking for nothing:
//! an idle proxy polling every 250 ms spent about 100 µs of CPU a poll on
//! this VM (a wake-up, then five syscalls), 400 µs a second for a file that
//! rarely changes.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::inotify;

use crate::POLL_INTERVAL;

/// With inotify, the file is still read this often: a change inotify does
/// not see (a network filesystem, a watched directory itself replaced)
/// applies within this.
pub(crate) const FALLBACK: Duration = Duration::from_secs(5);

/// Blocks until the file may have changed: something happened in its
/// directory (or, for a symlink, in its target's), or `FALLBACK` passed;
/// every `POLL_INTERVAL` where inotify cannot be had.
pub(crate) struct Changes {
    inotify: Option<OwnedFd>,
}

impl Changes {
    pub(crate) fn new(path: &Path) -> Self {
        let inotify = watch_dirs(path).unwrap_or_else(|e| {
            tracing::debug!(path = %path.display(), error = %e, "no inotify; polling the destinations file");
            None
        });
        Self { inotify }
    }

    /// Whether events, not only the clock, say when to look.
    #[cfg(test)]
    pub(crate) fn notified(&self) -> bool {
        self.inotify.is_some()
    }

    pub(crate) fn wait(&mut self) {
        let Some(fd) = &self.inotify else {
            std::thread::sleep(POLL_INTERVAL);
            return;
        };
        let timeout = Timespec {
            tv_sec: FALLBACK.as_secs() as _,
            tv_nsec: 0,
        };
        // An error (EINTR) only means the file is looked at now.
        let _ = rustix::event::poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&timeout));
        // Which names changed does not matter: the file is read and compared.
        let mut buf = [0u8; 4096];
        while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
    }
}

fn watch_dirs(path: &Path) -> rustix::io::Result<Option<OwnedFd>> {
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    let flags = inotify::WatchFlags::CLOSE_WRITE
        | inotify::WatchFlags::MODIFY
        | inotify::WatchFlags::ATTRIB
        | inotify::WatchFlags::CREATE
        | inotify::WatchFlags::DELETE
        | inotify::WatchFlags::MOVED_FROM
        | inotify::WatchFlags::MOVED_TO;
    let mut dirs: Vec<PathBuf> = vec![dir_of(path)];
    // A symlinked file (a Kubernetes ConfigMap volume) changes where its
    // target lives too.
    if let Ok(real) = std::fs::canonicalize(path) {
        let real_dir = dir_of(&real);
        if !dirs.contains(&real_dir) {
            dirs.push(real_dir);
        }
    }
    let mut watched = false;
    for dir in &dirs {
        watched |= inotify::add_watch(&fd, dir.as_path(), flags).is_ok();
    }
    Ok(watched.then_some(fd))
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_write_in_the_directory_ends_the_wait() {
        let dir = std::env::temp_dir().join(format!("weft-changes-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("d.yaml");
        std::fs::write(&file, "a").expect("write the file");
        let mut changes = Changes::new(&file);
        assert!(changes.notified(), "inotify works on this machine's /tmp");
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                std::fs::write(&file, "b")
            })
        };
        let start = Instant::now();
        changes.wait();
        let waited = start.elapsed();
        assert!(writer.join().is_ok_and(|r| r.is_ok()));
        assert!(
            waited >= Duration::from_millis(90) && waited < FALLBACK,
            "woke after {waited:?}: by the write, not by the clock or at once"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
