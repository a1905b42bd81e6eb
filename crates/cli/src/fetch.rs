//! A plain HTTP/1.1 GET, for admin endpoints and Prometheus's API.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// A response worth reading: status, the server's clock, the body.
pub(crate) struct Fetched {
    pub status: http::StatusCode,
    /// From the `Date` header, when the server sent one.
    pub date: Option<SystemTime>,
    pub body: String,
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// GETs `url` (`http://host:port/path?query`).
pub(crate) async fn get(url: &str) -> anyhow::Result<Fetched> {
    tokio::time::timeout(TIMEOUT, get_inner(url))
        .await
        .with_context(|| format!("GET {url}: no answer within {}s", TIMEOUT.as_secs()))?
        .with_context(|| format!("GET {url}"))
}

async fn get_inner(url: &str) -> anyhow::Result<Fetched> {
    let uri: http::Uri = url.parse().context("not a URL")?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "only http:// URLs are supported"
    );
    let authority = uri.authority().context("the URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port)).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status();
    let date = rsp
        .headers()
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok());
    let body = rsp.into_body().collect().await?.to_bytes();
    driver.abort();
    let body = String::from_utf8(body.to_vec()).context("the body is not UTF-8")?;
    Ok(Fetched { status, date, body })
}

/// GETs `url`, requiring a 2xx answer.
pub(crate) async fn get_ok(url: &str) -> anyhow::Result<Fetched> {
    let f = get(url).await?;
    anyhow::ensure!(
        f.status.is_success(),
        "GET {url}: {}: {}",
        f.status,
        f.body.trim()
    );
    Ok(f)
}
