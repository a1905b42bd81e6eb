//! Single-use bootstrap tokens that were used, remembered until they
//! expire. Kept in a file as well as in memory, so a restart of the control
//! plane does not make a used token good again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Outstanding spent tokens are bounded: each was minted by an operator,
/// so reaching this means something mints them in a loop.
const MAX_SPENT: usize = 100_000;

pub struct SpentTokens {
    path: PathBuf,
    /// Nonce → expiry (unix seconds).
    spent: Mutex<HashMap<String, u64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    #[error("this single-use token was already used")]
    Replayed,
    #[error(
        "{MAX_SPENT} single-use tokens are remembered already; refusing more until some expire"
    )]
    Full,
    #[error("cannot record the token as used in {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SpentTokens {
    /// Reads `path` (a missing file is an empty list) and rewrites it
    /// without the expired entries.
    pub fn load(path: PathBuf, now: u64) -> Result<Self, SpendError> {
        let io = |source| SpendError::Io {
            path: path.clone(),
            source,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let mut spent = HashMap::new();
        for line in text.lines() {
            let parsed = line
                .split_once(' ')
                .and_then(|(n, e)| Some((n.to_string(), e.parse::<u64>().ok()?)));
            match parsed {
                Some((nonce, expires)) if expires > now => {
                    spent.insert(nonce, expires);
                }
                Some(_) => {}
                None => tracing::warn!(file = %path.display(), line, "ignoring a malformed line"),
            }
        }
        rewrite(&path, &spent).map_err(io)?;
        Ok(Self {
            path,
            spent: Mutex::new(spent),
        })
    }

    pub fn is_spent(&self, nonce: &str) -> bool {
        self.lock().contains_key(nonce)
    }

    /// Marks `nonce` used. It is claimed in memory first (so a concurrent
    /// use of the same token is refused) and the claim stands only once it
    /// is on disk: if it cannot be recorded, the claim is withdrawn and the
    /// token refused, never accepted twice. The lock is never held across
    /// the write and its fsync; call this off the async runtime (it
    /// blocks on the disk).
    pub fn spend(&self, nonce: &str, expires: u64, now: u64) -> Result<(), SpendError> {
        {
            let mut spent = self.lock();
            if spent.contains_key(nonce) {
                return Err(SpendError::Replayed);
            }
            if spent.len() >= MAX_SPENT {
                spent.retain(|_, e| *e > now);
                if spent.len() >= MAX_SPENT {
                    return Err(SpendError::Full);
                }
            }
            spent.insert(nonce.to_string(), expires);
        }
        append(&self.path, nonce, expires).map_err(|source| {
            self.lock().remove(nonce);
            SpendError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.spent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn append(path: &Path, nonce: &str, expires: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{nonce} {expires}\n").as_bytes())?;
    f.sync_data()
}

fn rewrite(path: &Path, spent: &HashMap<String, u64>) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    for (nonce, expires) in spent {
        f.write_all(format!("{nonce} {expires}\n").as_bytes())?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_token_stays_spent_across_a_restart_until_it_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spent-tokens");
        let spent = SpentTokens::load(path.clone(), 100).expect("load");
        spent.spend("aa", 200, 100).expect("first use");
        spent.spend("bb", 150, 100).expect("first use");
        assert!(matches!(
            spent.spend("aa", 200, 100),
            Err(SpendError::Replayed)
        ));
        let restarted = SpentTokens::load(path.clone(), 160).expect("reload");
        assert!(restarted.is_spent("aa"));
        // Expired entries are dropped from memory and from the file.
        assert!(!restarted.is_spent("bb"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "aa 200\n");
    }

    #[test]
    fn a_use_that_cannot_be_recorded_is_refused_and_leaves_no_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spent-tokens");
        let spent = SpentTokens::load(path.clone(), 100).expect("load");
        // The file's place becomes a directory: the append fails.
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("mkdir");
        assert!(matches!(
            spent.spend("aa", 200, 100),
            Err(SpendError::Io { .. })
        ));
        assert!(!spent.is_spent("aa"), "the failed use's claim is withdrawn");
        std::fs::remove_dir(&path).expect("rmdir");
        spent.spend("aa", 200, 100).expect("recorded now");
        assert!(spent.is_spent("aa"));
    }
}
