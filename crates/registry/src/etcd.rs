//! A small etcd v3 client: what weft needs of etcd (prefix ranges, puts,
//! deletes, prefix watches and leases) over etcd's own gRPC API, generated
//! at build time from `proto/etcd/rpc.proto` without a `protoc` binary.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

pub use pb::event::EventType;
pub use pb::{Event, KeyValue, LeaseKeepAliveResponse, WatchResponse};

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// How long connecting to one etcd endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a unary call may take; watches and keep-alives are streams and
/// are bounded by HTTP/2 keep-alive instead.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("invalid etcd endpoint {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to etcd at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("etcd answered {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(#[from] tonic::Status),
    #[error("etcd closed the {0} stream")]
    StreamClosed(&'static str),
    #[error("etcd refused to grant a lease: {0}")]
    Lease(String),
}

/// A connection to one member of an etcd cluster.
#[derive(Clone, Debug)]
pub struct Etcd {
    url: String,
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
}

impl Etcd {
    /// Connects to the first of `urls` that answers, trying them in order
    /// from a random start so a fleet of clients spreads over the members.
    pub async fn connect(urls: &[String]) -> Result<Self, EtcdError> {
        if urls.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let start = fastrand::usize(..urls.len());
        let mut last = None;
        for i in 0..urls.len() {
            let url = &urls[(start + i) % urls.len()];
            match Self::connect_one(url).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EtcdError::NoEndpoints))
    }

    async fn connect_one(url: &str) -> Result<Self, EtcdError> {
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let endpoint = Endpoint::from_shared(full.clone())
            .map_err(|source| EtcdError::Url {
                url: url.to_string(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| EtcdError::Connect {
                url: url.to_string(),
                source,
            })?;
        Ok(Self {
            url: full,
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn get_prefix(&mut self, prefix: &str) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let rsp = self
            .kv
            .range(call(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok((rsp.header.map_or(0, |h| h.revision), rsp.kvs))
    }

    /// Puts `key`, under `lease` when it is not 0.
    pub async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<(), EtcdError> {
        self.kv
            .put(call(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                lease,
            }))
            .await?;
        Ok(())
    }

    /// Deletes `key`; returns how many keys went (0 or 1).
    pub async fn delete(&mut self, key: impl Into<Vec<u8>>) -> Result<i64, EtcdError> {
        let rsp = self
            .kv
            .delete_range(call(pb::DeleteRangeRequest {
                key: key.into(),
                range_end: Vec::new(),
            }))
            .await?;
        Ok(rsp.into_inner().deleted)
    }

    /// Grants a lease of `ttl` seconds; returns its ID.
    pub async fn lease_grant(&mut self, ttl: i64) -> Result<i64, EtcdError> {
        let rsp = self
            .lease
            .lease_grant(call(pb::LeaseGrantRequest { ttl, id: 0 }))
            .await?
            .into_inner();
        if !rsp.error.is_empty() {
            return Err(EtcdError::Lease(rsp.error));
        }
        Ok(rsp.id)
    }

    pub async fn lease_revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        self.lease
            .lease_revoke(call(pb::LeaseRevokeRequest { id }))
            .await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id`: each `KeepAlive::renew`
    /// asks etcd to restart the lease's TTL, and etcd answers on the stream.
    pub async fn lease_keep_alive(&mut self, id: i64) -> Result<KeepAlive, EtcdError> {
        let (tx, rx) = mpsc::channel(4);
        // etcd sends the stream's response headers only with its first
        // answer, so the call returns only once a request is on its way.
        tx.send(pb::LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| EtcdError::StreamClosed("lease keep-alive"))?;
        let responses = self
            .lease
            .lease_keep_alive(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(KeepAlive { id, tx, responses })
    }

    /// Follows every key under `prefix` from `start_revision` (0: now).
    pub async fn watch_prefix(
        &mut self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let (tx, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision,
                    progress_notify: false,
                },
            )),
        };
        tx.send(create)
            .await
            .map_err(|_| EtcdError::StreamClosed("watch"))?;
        let responses = self
            .watch
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        // The request side stays open as long as the watch: dropping it
        // would end the stream.
        Ok(Watch {
            _requests: tx,
            responses,
        })
    }
}

/// A lease's keep-alive stream.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    tx: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    pub async fn renew(&mut self) -> Result<(), EtcdError> {
        self.tx
            .send(pb::LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| EtcdError::StreamClosed("lease keep-alive"))
    }

    /// etcd's next answer; `None` when the stream ended.
    pub async fn message(&mut self) -> Result<Option<LeaseKeepAliveResponse>, EtcdError> {
        Ok(self.responses.message().await?)
    }
}

/// A prefix watch.
#[derive(Debug)]
pub struct Watch {
    _requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<WatchResponse>,
}

impl Watch {
    /// The next batch of events; `None` when the stream ended.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        Ok(self.responses.message().await?)
    }
}

fn call<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(CALL_TIMEOUT);
    req
}

/// The end of the range of keys starting with `prefix`: the prefix with its
/// last byte that is not 0xff incremented (and what follows it dropped), or
/// `[0]` (every key) when there is none, as etcd defines it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/weft/"), b"/weft0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
