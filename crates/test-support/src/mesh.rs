//! A mesh's certificate authority in a temporary directory, and the
//! bootstrap tokens its proxies present.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use weft_identity::{CaDir, Name, TokenKey};

use crate::backend::{Backend, Behaviour};
use crate::control::Control;
use crate::proxy::Proxy;
use crate::{DestinationsFile, workspace_binary};

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

    /// A reusable bootstrap token for `name`, valid for `ttl`.
    pub fn token(&self, name: &str, ttl: Duration) -> anyhow::Result<String> {
        Ok(self.tokens.mint(&name.parse()?, ttl, SystemTime::now()))
    }

    /// A single-use bootstrap token for `name`, valid for `ttl`.
    pub fn token_once(&self, name: &str, ttl: Duration) -> anyhow::Result<String> {
        Ok(self
            .tokens
            .mint_once(&name.parse()?, ttl, SystemTime::now())?)
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

/// A meshed proxy's environment.
pub fn meshed(ca: &MeshCa, control: &Control, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(vec![
        ("WEFT_PROXY_CONTROL_ADDR".into(), control.grpc.to_string()),
        ("WEFT_PROXY_IDENTITY_NAME".into(), name.into()),
        (
            "WEFT_PROXY_IDENTITY_TOKEN_FILE".into(),
            ca.token_file(name)?,
        ),
        ("WEFT_PROXY_TRUST_ANCHORS".into(), ca.anchors()),
    ])
}

pub async fn start_proxy(env: &[(String, String)]) -> anyhow::Result<Proxy> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proxy::start(&workspace_binary("weft-proxy")?, &env).await
}

pub fn api_destination(addr: std::net::SocketAddr, identity: &str) -> String {
    format!(
        "destinations:\n  \"api.demo:8080\":\n    endpoints:\n      - addr: {addr}\n        identity: {identity}\n"
    )
}

/// A control plane, the `api` service behind a meshed proxy, and a meshed
/// client-side proxy for `web`.
pub struct Mesh {
    pub ca: MeshCa,
    pub dests: DestinationsFile,
    pub control: Control,
    pub backend: Backend,
    pub server: Proxy,
    pub client: Proxy,
}

impl Mesh {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Behaviour::default()).await
    }

    /// The same, with the backend misbehaving as `behaviour` says.
    pub async fn start_with(behaviour: Behaviour) -> anyhow::Result<Self> {
        let ca = MeshCa::new()?;
        let dests = DestinationsFile::from_yaml("destinations: {}\n")?;
        let control = Control::start(
            &workspace_binary("weft-control")?,
            &ca,
            &["--destinations", &dests.path_str()],
        )
        .await?;
        let backend = Backend::start_with("api", "127.0.0.1:0".parse()?, behaviour).await?;
        let mut env = meshed(&ca, &control, "api.demo")?;
        env.push((
            "WEFT_PROXY_INBOUND_FORWARD".into(),
            backend.addr.to_string(),
        ));
        let server = start_proxy(&env).await?;
        dests.write_yaml(&api_destination(server.inbound, "api.demo"))?;
        // The control plane polls the file every 250 ms; a proxy asking
        // before then would rightly be told the name does not exist.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let client = start_proxy(&meshed(&ca, &control, "web.demo")?).await?;
        Ok(Self {
            ca,
            dests,
            control,
            backend,
            server,
            client,
        })
    }
}

impl Mesh {
    /// The mesh as a Prometheus file_sd targets file, the way `weft demo`
    /// writes one: both proxies labelled with their workload and identity,
    /// and the control plane. `extra` groups are appended.
    pub fn write_targets(
        &self,
        path: &std::path::Path,
        extra: &[serde_json::Value],
    ) -> anyhow::Result<()> {
        let proxy = |admin: std::net::SocketAddr, name: &str| {
            serde_json::json!({"targets": [admin.to_string()],
                "labels": {"role": "proxy", "workload": name, "identity": name}})
        };
        let mut groups = vec![
            proxy(self.client.admin, "web.demo"),
            proxy(self.server.admin, "api.demo"),
            serde_json::json!({"targets": [self.control.admin.to_string()],
                "labels": {"role": "control", "grpc": self.control.grpc.to_string(),
                    "anchors": self.control.anchors.display().to_string()}}),
        ];
        groups.extend_from_slice(extra);
        std::fs::write(path, serde_json::to_vec(&groups)?)?;
        Ok(())
    }
}
