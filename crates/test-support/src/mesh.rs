//! A mesh's certificate authority in a temporary directory, and the
//! bootstrap tokens its proxies present.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use weft_identity::{CaDir, Name, TokenKey};

pub struct MeshCa {
    tmp: tempfile::TempDir,
    pub dir: CaDir,
    tokens: TokenKey,
}

impl MeshCa {
    /// `weft identity init` into a fresh directory.
    pub fn new() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = CaDir::new(tmp.path().join("ca"));
        dir.init(&"weft.local".parse()?, false)?;
        let tokens = TokenKey::from_hex(&std::fs::read_to_string(dir.token_key())?)?;
        Ok(Self { tmp, dir, tokens })
    }

    /// The `--identity-dir` of weft-control.
    pub fn dir_str(&self) -> String {
        self.dir.dir.to_string_lossy().into_owned()
    }

    /// The trust anchors file, for `WEFT_PROXY_TRUST_ANCHORS`.
    pub fn anchors(&self) -> String {
        self.dir.anchor_cert().to_string_lossy().into_owned()
    }

    /// Writes a token for `name` and returns its path, for
    /// `WEFT_PROXY_IDENTITY_TOKEN_FILE`.
    pub fn token_file(&self, name: &str) -> anyhow::Result<String> {
        let name: Name = name.parse()?;
        let token = self.tokens.mint(
            &name,
            Duration::from_secs(30 * 24 * 3600),
            SystemTime::now(),
        );
        let path: PathBuf = self.tmp.path().join(format!("{name}.token"));
        std::fs::write(&path, token)?;
        Ok(path.to_string_lossy().into_owned())
    }
}
