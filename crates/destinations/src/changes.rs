//! Waiting for the destinations file to change without waking for nothing:
//! an idle proxy polling every 250 ms spent about 100 µs of CPU a poll on
//! this VM (a wake-up, then five syscalls), 400 µs a second for a file that
//! rarely changes.

use std::ffi::{OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::inotify;

use crate::POLL_INTERVAL;

/// With inotify, the file is still read this often: a change inotify does
/// not see (a network filesystem, an absolute symlink into another
/// directory) applies within this.
pub(crate) const FALLBACK: Duration = Duration::from_secs(5);

/// Blocks until the file may have changed: an entry that leads to it
/// changed in its directory (the file itself, or the first step of a
/// relative symlink: a Kubernetes ConfigMap volume swaps `..data`), or
/// `FALLBACK` passed; every `POLL_INTERVAL` where inotify cannot be had.
/// Other names in the directory are ignored: a log written beside the file
/// must not make the proxy read it again on every write.
pub(crate) struct Changes {
    inotify: Option<OwnedFd>,
    names: Vec<OsString>,
}

impl Changes {
    pub(crate) fn new(path: &Path) -> Self {
        let mut names: Vec<OsString> = path
            .file_name()
            .map(OsStr::to_os_string)
            .into_iter()
            .collect();
        if let Ok(target) = std::fs::read_link(path)
            && let Some(Component::Normal(first)) = target.components().next()
            && !names.iter().any(|n| n == first)
        {
            names.push(first.to_os_string());
        }
        let inotify = watch_dir(path).unwrap_or_else(|e| {
            tracing::debug!(path = %path.display(), error = %e, "no inotify; polling the destinations file");
            None
        });
        Self { inotify, names }
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
        let deadline = Instant::now() + FALLBACK;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = Timespec {
                tv_sec: left.as_secs() as _,
                tv_nsec: left.subsec_nanos() as _,
            };
            match rustix::event::poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&timeout)) {
                Ok(0) => return,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                // Looked at now, and polled no more tightly than the clock.
                Err(_) => {
                    std::thread::sleep(POLL_INTERVAL);
                    return;
                }
            }
            if self.drain(fd) {
                return;
            }
        }
    }

    /// Reads every queued event; whether one may concern the file.
    fn drain(&self, fd: &OwnedFd) -> bool {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(fd, &mut buf);
        let mut relevant = false;
        loop {
            match reader.next() {
                Ok(event) => {
                    relevant |= match event.file_name() {
                        Some(name) => self.names.iter().any(|n| n.as_bytes() == name.to_bytes()),
                        // The directory itself, or the queue overflowed.
                        None => true,
                    };
                }
                Err(rustix::io::Errno::AGAIN) => return relevant,
                Err(_) => return true,
            }
        }
    }
}

fn watch_dir(path: &Path) -> rustix::io::Result<Option<OwnedFd>> {
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    let flags = inotify::WatchFlags::CLOSE_WRITE
        | inotify::WatchFlags::MODIFY
        | inotify::WatchFlags::ATTRIB
        | inotify::WatchFlags::CREATE
        | inotify::WatchFlags::DELETE
        | inotify::WatchFlags::MOVED_FROM
        | inotify::WatchFlags::MOVED_TO;
    inotify::add_watch(&fd, dir_of(path).as_path(), flags)?;
    Ok(Some(fd))
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

    #[test]
    fn a_write_to_the_file_ends_the_wait_and_its_neighbours_do_not() {
        let dir = std::env::temp_dir().join(format!("weft-changes-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("d.yaml");
        std::fs::write(&file, "a").expect("write the file");
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
                // As the kubelet does: a new link, renamed over the old.
                std::os::unix::fs::symlink("v2", dir.join("..data_tmp"))?;
                std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))
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
