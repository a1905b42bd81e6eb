//! Replacing a running proxy under live traffic. On SIGUSR2 the proxy
//! starts the binary at the path it was started from (so a binary replaced
//! on disk is picked up) and hands it its listening sockets over a private
//! Unix socket (SCM_RIGHTS). The new process serves on the same sockets, so
//! no connection is refused or queued on a socket that goes away; once it
//! says it is ready, the old one stops accepting and drains. If the new
//! process exits, or is not ready in time, the old one keeps serving.
//!
//! The hand-over socket lives in a directory only this user can enter, and
//! only the process we started may fetch the sockets (checked by the peer
//! credentials of the connection).

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::tls::HeldCert;

/// Set by the old process for the new one: where to fetch the sockets.
pub const ENV_UPGRADE_FROM: &str = "WEFT_PROXY_UPGRADE_FROM";

/// The largest hand-over message: listener names and every certificate
/// chain with its key (a few KiB each).
const MAX_HEADER: usize = 1 << 20;

/// At most this many sockets change hands.
const MAX_SOCKETS: usize = 16;
const READY: &str = "ready";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot find this process's binary: {0}")]
    Exe(#[source] io::Error),
    #[error("cannot create the hand-over socket in {}: {source}", dir.display())]
    Socket {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the new process (pid {pid}) exited ({status}) before it was ready; see its log above")]
    Exited {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("the new process (pid {pid}) was not ready within {}; it was stopped", humantime::format_duration(*timeout))]
    Timeout { pid: u32, timeout: Duration },
    #[error("handing the sockets to pid {pid}: {source}")]
    HandOver {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{ENV_UPGRADE_FROM}={}: {source}", path.display())]
    Fetch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What travels with the descriptors: which listener each one is.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    pid: u32,
    listeners: Vec<String>,
    /// The certificates held now, with their keys: the new process serves
    /// at once, needing neither its token nor the control plane.
    #[serde(default)]
    certificates: Vec<HeldCert>,
}

/// The old process's side.
#[derive(Debug)]
pub struct Upgrader {
    exe: PathBuf,
    timeout: Duration,
}

impl Upgrader {
    /// Remembers the binary's path now: once it is replaced on disk,
    /// `/proc/self/exe` names the deleted file.
    pub fn new(timeout: Duration) -> Result<Self, UpgradeError> {
        let exe = std::env::current_exe().map_err(UpgradeError::Exe)?;
        Ok(Self { exe, timeout })
    }

    /// Starts the new process, hands it `listeners` and `certificates`
    /// and waits until it is ready. Returns its pid; on error the new
    /// process has been stopped.
    pub async fn hand_over(
        &self,
        listeners: &[(&str, BorrowedFd<'_>)],
        certificates: Vec<HeldCert>,
    ) -> Result<u32, UpgradeError> {
        let dir = PrivateDir::create()?;
        let path = dir.0.join("handover.sock");
        let server = UnixListener::bind(&path).map_err(|source| UpgradeError::Socket {
            dir: dir.0.clone(),
            source,
        })?;
        let child = tokio::process::Command::new(&self.exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_UPGRADE_FROM, &path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                exe: self.exe.clone(),
                source,
            })?;
        let mut child = StopOnDrop(Some(child));
        let pid = child.pid();
        tracing::info!(pid, exe = %self.exe.display(), "upgrade: started the new process");
        let exchange = async {
            let mut stream = accept_from(&server, pid).await?;
            send(&mut stream, listeners, certificates).await?;
            wait_ready(stream).await
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(self.timeout, exchange) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(UpgradeError::HandOver { pid, source }),
                Err(_) => Err(UpgradeError::Timeout { pid, timeout: self.timeout }),
            },
            status = child.wait() => Err(match status {
                Ok(status) => UpgradeError::Exited { pid, status },
                Err(source) => UpgradeError::HandOver { pid, source },
            }),
        };
        match outcome {
            Ok(()) => {
                child.release();
                Ok(pid)
            }
            Err(UpgradeError::HandOver { pid, source }) => {
                // The socket closed early: usually because the process
                // died; its exit status says more than the socket error.
                match tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
                    Ok(Ok(status)) => Err(UpgradeError::Exited { pid, status }),
                    _ => Err(UpgradeError::HandOver { pid, source }),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// The process being started, stopped unless it takes over.
struct StopOnDrop(Option<tokio::process::Child>);

impl StopOnDrop {
    fn pid(&self) -> u32 {
        self.0.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }

    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        match self.0.as_mut() {
            Some(c) => c.wait().await,
            None => std::future::pending().await,
        }
    }

    /// The new process runs on after this one exits.
    fn release(&mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.start_kill();
            // Reap it, so no zombie is left while this process serves on.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        }
    }
}

/// A directory only this user can enter, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<Self, UpgradeError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = base.join(format!("weft-proxy-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| UpgradeError::Socket {
                dir: dir.clone(),
                source,
            })?;
        Ok(Self(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first connection from process `pid`; any other is closed.
async fn accept_from(server: &UnixListener, pid: u32) -> io::Result<UnixStream> {
    loop {
        let (stream, _) = server.accept().await?;
        match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(cred) if cred.pid.as_raw_nonzero().get() as u32 == pid => return Ok(stream),
            Ok(cred) => tracing::warn!(
                pid = cred.pid.as_raw_nonzero().get(),
                "upgrade: ignoring a hand-over connection from another process"
            ),
            Err(e) => tracing::warn!(error = %e, "upgrade: cannot identify a hand-over connection"),
        }
    }
}

/// The header's length (4 bytes, big-endian) carries the descriptors;
/// the header follows.
async fn send(
    stream: &mut UnixStream,
    listeners: &[(&str, BorrowedFd<'_>)],
    certificates: Vec<HeldCert>,
) -> io::Result<()> {
    let header = Header {
        pid: std::process::id(),
        listeners: listeners.iter().map(|(n, _)| n.to_string()).collect(),
        certificates,
    };
    let body = serde_json::to_vec(&header).map_err(io::Error::other)?;
    if body.len() > MAX_HEADER {
        return Err(io::Error::other("the hand-over message is too large"));
    }
    let len = (body.len() as u32).to_be_bytes();
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| *fd).collect();
    let sent = loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("too many sockets to hand over"));
            }
            Ok(rustix::net::sendmsg(
                &*stream,
                &[io::IoSlice::new(&len)],
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        match sent {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&len[sent..]).await?;
    stream.write_all(&body).await?;
    stream.flush().await
}

async fn wait_ready(stream: UnixStream) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    if line.trim_end() == READY {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the new process closed the hand-over socket before it was ready",
        ))
    }
}

/// The new process's side: the sockets it was handed, by listener name.
#[derive(Debug)]
pub struct Inherited {
    from_pid: u32,
    listeners: HashMap<String, std::net::TcpListener>,
    certificates: Vec<HeldCert>,
    stream: UnixStream,
}

impl Inherited {
    /// The sockets of the process that started this one, when it did.
    pub async fn fetch() -> Result<Option<Self>, UpgradeError> {
        let Some(path) = std::env::var_os(ENV_UPGRADE_FROM) else {
            return Ok(None);
        };
        let path = PathBuf::from(path);
        let fail = |source| UpgradeError::Fetch {
            path: path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&path).await.map_err(fail)?;
        let (header, fds) = tokio::time::timeout(Duration::from_secs(10), receive(&mut stream))
            .await
            .map_err(|_| fail(io::ErrorKind::TimedOut.into()))?
            .map_err(fail)?;
        if header.listeners.len() != fds.len() {
            return Err(fail(io::Error::other(format!(
                "{} listeners named, {} sockets received",
                header.listeners.len(),
                fds.len()
            ))));
        }
        let mut listeners = HashMap::new();
        for (name, fd) in header.listeners.into_iter().zip(fds) {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true).map_err(fail)?;
            listeners.insert(name, listener);
        }
        Ok(Some(Self {
            from_pid: header.pid,
            listeners,
            certificates: header.certificates,
            stream,
        }))
    }

    pub fn from_pid(&self) -> u32 {
        self.from_pid
    }

    /// The inherited listener `name`, if it is bound where the
    /// configuration asks (a configured port 0 takes any port); otherwise
    /// the caller binds afresh and the inherited socket is closed.
    pub fn take(&mut self, name: &str, want: SocketAddr) -> Option<std::net::TcpListener> {
        let listener = self.listeners.remove(name)?;
        let have = listener.local_addr().ok()?;
        let matches = have == want || (want.port() == 0 && have.ip() == want.ip());
        if matches {
            Some(listener)
        } else {
            tracing::info!(%have, %want, listener = name, "upgrade: the listener moved; binding afresh");
            None
        }
    }

    /// The certificate the old process held for `identity`, if any.
    pub fn take_certificate(&mut self, identity: &str) -> Option<HeldCert> {
        let i = self.certificates.iter().position(|c| c.name == identity)?;
        Some(self.certificates.swap_remove(i))
    }

    /// Tells the old process to stop accepting and drain.
    pub async fn ready(mut self) -> io::Result<()> {
        self.stream
            .write_all(format!("{READY}\n").as_bytes())
            .await?;
        self.stream.flush().await
    }
}

async fn receive(stream: &mut UnixStream) -> io::Result<(Header, Vec<OwnedFd>)> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let (got, fds) = loop {
        stream.readable().await?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                &*stream,
                &mut [io::IoSliceMut::new(&mut len)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = m {
                    fds.extend(rights);
                }
            }
            Ok((msg.bytes, fds))
        });
        match got {
            Ok((0, _)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the old process closed the hand-over socket",
                ));
            }
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.read_exact(&mut len[got..]).await?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a hand-over message of {n} bytes"),
        ));
    }
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body).await?;
    let header: Header =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((header, fds))
}
