//! The built-in `demo-service` target: a small HTTP service inside cloudtapd, so the
//! quickstart needs nothing else.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /` | a greeting naming the endpoints |
//! | `ANY /echo` | the request's method, path, headers and body as JSON |
//! | `GET /bytes/{n}` | `n` deterministic bytes (at most 64 MiB) |
//! | `GET /status/{code}` | an empty response with that status |
//! | `GET /delay/{ms}` | answers after `ms` milliseconds (at most 60 s) |

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const DEMO_TARGET: &str = "demo-service";
const MAX_BYTES: usize = 64 * 1024 * 1024;

pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/echo", any(echo))
        .route("/bytes/{n}", get(bytes))
        .route("/status/{code}", get(status))
        .route("/delay/{ms}", get(delay))
}

pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let _ = axum::serve(listener, router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

async fn index() -> &'static str {
    "hello from cloudtap demo-service\nendpoints: / /echo /bytes/{n} /status/{code} /delay/{ms}\n"
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap, req: Request) -> Response {
    let body = match axum::body::to_bytes(req.into_body(), MAX_BYTES).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response(),
    };
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    axum::Json(serde_json::json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query().unwrap_or(""),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

async fn bytes(Path(n): Path<usize>) -> Response {
    if n > MAX_BYTES {
        return (
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_BYTES} bytes\n"),
        )
            .into_response();
    }
    // Deterministic content so a client can check what it got.
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    (
        [("content-type", "application/octet-stream")],
        Body::from(Bytes::from(data)),
    )
        .into_response()
}

async fn status(Path(code): Path<u16>) -> Response {
    match StatusCode::from_u16(code) {
        Ok(s) => s.into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "status must be 100-999\n").into_response(),
    }
}

async fn delay(Path(ms): Path<u64>) -> Response {
    let ms = ms.min(60_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("waited {ms} ms\n").into_response()
}
