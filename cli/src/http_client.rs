//! A small HTTP/1.1 JSON client for the HTTP API fallback (plain HTTP: the API is
//! served on loopback only in this build).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach the HTTP API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Other(String),
}

/// Sends one request; returns the status and the body.
pub async fn call(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), HttpError> {
    call_accepting(base, method, path, bearer, body, "application/json").await
}

/// [`call`], asking for the media type `accept`.
pub async fn call_accepting(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    accept: &str,
) -> Result<(u16, Vec<u8>), HttpError> {
    let resp = send(base, method, path, bearer, body, accept).await?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| HttpError::Other(format!("HTTP API response failed: {e}")))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

/// Sends one request and returns the response with its body still to be read (large
/// downloads are read piece by piece).
pub async fn send(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    accept: &str,
) -> Result<http::Response<hyper::body::Incoming>, HttpError> {
    let rest = base.strip_prefix("http://").ok_or_else(|| {
        HttpError::Other(format!(
            "--http-url {base:?} must start with http:// (the HTTP API listens on loopback only in this build)"
        ))
    })?;
    let authority = rest.trim_end_matches('/');
    let unreachable = |reason: String| HttpError::Unreachable {
        url: base.into(),
        reason,
    };
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        TcpStream::connect(authority),
    )
    .await
    .map_err(|_| unreachable("connect timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .header("accept", accept);
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| HttpError::Other(e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| HttpError::Other(format!("HTTP API request failed: {e}")))
}
