//! Waiting for the destinations file to change without waking for nothing:
//! an idle proxy polling every 250 ms spent about 100 µs of CPU a poll on
//! this VM (a wake-up, then five syscalls), 400 µs a second for a file that
//! rarely changes.

use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::inotify;

use crate::POLL_INTERVAL;

/// With inotify, the file is still read this often: a change inotify does
/// not see (a network filesystem, a symlink's intermediate link swapped
/// while its old target lives on) applies within this.
pub(crate) const FALLBACK: Duration = Duration::from_secs(5);

/// Blocks until the file may have changed: inotify on the file itself (the
/// target, through symlinks) reports a write, a change of its links (it
/// was replaced or removed), or `FALLBACK` passed; every `POLL_INTERVAL`
/// where inotify cannot be had. The file, not its directory, is watched: a
/// log written beside it must not wake the proxy at all (a directory watch
/// did, once per line h2load logged in the bench: 4-5 µs of weft's CPU per
/// request).
pub(crate) struct Changes {
    path: PathBuf,
    inotify: Option<(OwnedFd, Option<i32>)>,
}

impl Changes {
    pub(crate) fn new(path: &Path) -> Self {
        let inotify = match inotify::init(
            inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK,
        ) {
            Ok(fd) => Some((fd, None)),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no inotify; polling the destinations file");
                None
            }
        };
        let mut changes = Self {
            path: path.to_path_buf(),
            inotify,
        };
        changes.rewatch();
        changes
    }

    /// Whether events, not only the clock, say when to look.
    #[cfg(test)]
    pub(crate) fn notified(&self) -> bool {
        matches!(self.inotify, Some((_, Some(_))))
    }

    /// Watches whatever the path names now (a replaced file is a new
    /// inode), dropping the watch on what it named before.
    fn rewatch(&mut self) {
        let Some((fd, wd)) = &mut self.inotify else {
            return;
        };
        let flags = inotify::WatchFlags::MODIFY
            | inotify::WatchFlags::CLOSE_WRITE
            | inotify::WatchFlags::ATTRIB
            | inotify::WatchFlags::DELETE_SELF
            | inotify::WatchFlags::MOVE_SELF;
        let new = inotify::add_watch(&*fd, self.path.as_path(), flags).ok();
        if let Some(old) = *wd
            && new != Some(old)
        {
            // Gone already if its file was deleted.
            let _ = inotify::remove_watch(&*fd, old);
        }
        *wd = new;
    }

    pub(crate) fn wait(&mut self) {
        match &self.inotify {
            Some((fd, Some(_))) => wait_for_event(fd, FALLBACK),
            // Nothing to watch (no inotify, or the file is missing for now).
            _ => std::thread::sleep(POLL_INTERVAL),
        }
        self.rewatch();
    }
}

/// Until an event is queued on `fd` or `timeout` passed.
fn wait_for_event(fd: &OwnedFd, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        match rustix::event::poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&ts)) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(n) if n > 0 => drain(fd),
            Ok(_) => {}
            // Never looked at more often than without inotify.
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
        return;
    }
}

/// Reads every queued event: any of them means "look".
fn drain(fd: &OwnedFd) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    while reader.next().is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, holding `d.yaml`.
    fn scratch(tag: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("weft-changes-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("d.yaml");
        let made = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, "a"));
        assert!(made.is_ok(), "{made:?}");
        (dir, file)
    }

    #[test]
    fn a_write_to_the_file_ends_the_wait_and_its_neighbours_do_not() {
        let (dir, file) = scratch("write");
        let mut changes = Changes::new(&file);
        assert!(changes.notified(), "inotify works on this machine's /tmp");
        let writer = {
            let (file, neighbour) = (file.clone(), dir.join("access.log"));
            std::thread::spawn(move || {
                // Writes beside the file do not count.
                for _ in 0..5 {
                    std::fs::write(&neighbour, "x")?;
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::fs::write(&file, "b")
            })
        };
        let start = Instant::now();
        changes.wait();
        let waited = start.elapsed();
        assert!(writer.join().is_ok_and(|r| r.is_ok()));
        assert!(
            waited >= Duration::from_millis(90) && waited < FALLBACK,
            "woke after {waited:?}: by the write, not by its neighbour's or the clock"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_replaced_by_rename_ends_the_wait_and_the_new_one_is_watched() {
        let (dir, file) = scratch("mv");
        let mut changes = Changes::new(&file);
        for (i, text) in ["b", "c"].into_iter().enumerate() {
            let writer = {
                let (file, new) = (file.clone(), dir.join(format!("d.yaml.{i}")));
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    if i == 0 {
                        // An editor's save: write aside, rename over.
                        std::fs::write(&new, text)?;
                        std::fs::rename(&new, &file)
                    } else {
                        // Then in place, on the file that replaced it.
                        std::fs::write(&file, text)
                    }
                })
            };
            let start = Instant::now();
            changes.wait();
            let waited = start.elapsed();
            assert!(writer.join().is_ok_and(|r| r.is_ok()));
            assert!(waited < FALLBACK, "change {i}: woke after {waited:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_configmap_swap_ends_the_wait() {
        let dir = std::env::temp_dir().join(format!("weft-changes-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let made = (|| {
            std::fs::create_dir_all(dir.join("v1"))?;
            std::fs::create_dir_all(dir.join("v2"))?;
            std::fs::write(dir.join("v1/d.yaml"), "a")?;
            std::fs::write(dir.join("v2/d.yaml"), "b")?;
            std::os::unix::fs::symlink("v1", dir.join("..data"))?;
            std::os::unix::fs::symlink("..data/d.yaml", dir.join("d.yaml"))
        })();
        assert!(made.is_ok(), "{made:?}");
        let mut changes = Changes::new(&dir.join("d.yaml"));
        let swap = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                // As the kubelet does: a new link renamed over the old, then the
                // old version removed.
                std::os::unix::fs::symlink("v2", dir.join("..data_tmp"))?;
                std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
                std::fs::remove_dir_all(dir.join("v1"))
            })
        };
        let start = Instant::now();
        changes.wait();
        let waited = start.elapsed();
        assert!(swap.join().is_ok_and(|r| r.is_ok()));
        assert!(waited < FALLBACK, "woke after {waited:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
