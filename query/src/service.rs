//! The query service's endpoints: gRPC `QueryService.Execute`, HTTP `POST /v1/query`
//! (and the Flight SQL service in [`crate::flight`]). All of them authenticate through
//! one [`Access`], run the engine, and record each query.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::StreamWriter;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use cloudtap_proto::query::v1 as pb;
use cloudtap_proto::query::v1::query_service_server::{
    QueryService as QueryServiceApi, QueryServiceServer,
};

use crate::{QueryEngine, QueryError, QueryOutput, Reader};

/// Authenticates callers and records what they ask. In `cloudtapd` this is the
/// control plane's own token check, policy and audit chain.
#[async_trait]
pub trait Access: Send + Sync + 'static {
    /// The reader named by an `authorization: Bearer …` header, and what they may see.
    async fn reader(&self, authorization: Option<&str>) -> Result<Reader, QueryError>;
    /// Records one query on the service's own chain: who, through which endpoint,
    /// the SQL (cut to a few KiB), and how it ended.
    async fn record(&self, reader: &Reader, via: &str, sql: &str, outcome: &str);
}

/// The engine behind every endpoint.
#[derive(Clone)]
pub struct QueryService {
    engine: Arc<QueryEngine>,
    access: Arc<dyn Access>,
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryService").finish_non_exhaustive()
    }
}

/// The HTTP routes this service adds (method, path), for the API's route list.
pub const HTTP_ROUTES: &[(&str, &str)] = &[("POST", "/v1/query")];

impl QueryService {
    pub fn new(engine: Arc<QueryEngine>, access: Arc<dyn Access>) -> Self {
        Self { engine, access }
    }

    pub fn engine(&self) -> &Arc<QueryEngine> {
        &self.engine
    }

    /// Authenticates, runs `sql`, and records it; errors are recorded too.
    pub async fn run(
        &self,
        authorization: Option<&str>,
        via: &str,
        sql: &str,
        max_rows: Option<u64>,
    ) -> Result<QueryOutput, QueryError> {
        let reader = self.access.reader(authorization).await?;
        self.run_as(&reader, via, sql, max_rows).await
    }

    /// Runs `sql` for an already authenticated reader, and records it.
    pub async fn run_as(
        &self,
        reader: &Reader,
        via: &str,
        sql: &str,
        max_rows: Option<u64>,
    ) -> Result<QueryOutput, QueryError> {
        let reader = reader.clone();
        let started = Instant::now();
        let result = self.engine.execute(&reader, sql, max_rows).await;
        let outcome = match &result {
            Ok(_) => format!("started after {} ms", started.elapsed().as_millis()),
            Err(e) => format!("refused: {}", e.code()),
        };
        self.access.record(&reader, via, sql, &outcome).await;
        result
    }

    /// Authenticates the caller only (Flight SQL's handshake and metadata calls).
    pub async fn reader(&self, authorization: Option<&str>) -> Result<Reader, QueryError> {
        self.access.reader(authorization).await
    }

    pub fn grpc(&self) -> QueryServiceServer<Self> {
        QueryServiceServer::new(self.clone())
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/query", post(http_query))
            .with_state(self.clone())
    }
}

/// An Arrow IPC stream written piece by piece: the schema message, then a message
/// per batch, then the end-of-stream marker.
pub struct IpcPieces {
    writer: StreamWriter<Vec<u8>>,
}

impl IpcPieces {
    pub fn new(schema: &SchemaRef) -> Result<(Self, Vec<u8>), QueryError> {
        let mut writer = StreamWriter::try_new(Vec::new(), schema).map_err(QueryError::internal)?;
        let head = std::mem::take(writer.get_mut());
        Ok((Self { writer }, head))
    }

    pub fn batch(&mut self, b: &RecordBatch) -> Result<Vec<u8>, QueryError> {
        self.writer.write(b).map_err(QueryError::internal)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }

    pub fn finish(mut self) -> Result<Vec<u8>, QueryError> {
        self.writer.finish().map_err(QueryError::internal)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }
}

type ExecuteStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::ExecuteResponse, tonic::Status>> + Send>>;

#[async_trait]
impl QueryServiceApi for QueryService {
    type ExecuteStream = ExecuteStream;

    async fn execute(
        &self,
        req: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<ExecuteStream>, tonic::Status> {
        let auth = authorization(&req);
        let req = req.into_inner();
        let started = Instant::now();
        let max_rows = (req.max_rows > 0).then_some(req.max_rows);
        let out = self
            .run(auth.as_deref(), "grpc", &req.sql, max_rows)
            .await
            .map_err(|e| e.to_status())?;
        let (mut ipc, head) = IpcPieces::new(&out.schema).map_err(|e| e.to_status())?;
        let truncated = out.truncated.clone();
        let stream = async_stream(move |tx| async move {
            let send = |m: Result<pb::ExecuteResponse, tonic::Status>| tx.send(m);
            if send(Ok(piece(head, None))).await.is_err() {
                return;
            }
            let mut rows = 0u64;
            let mut batches = out.batches;
            while let Some(b) = batches.next().await {
                let msg = b.and_then(|b| {
                    rows += b.num_rows() as u64;
                    ipc.batch(&b)
                });
                match msg {
                    Ok(bytes) => {
                        if send(Ok(piece(bytes, None))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = send(Err(e.to_status())).await;
                        return;
                    }
                }
            }
            let end = match ipc.finish() {
                Ok(b) => b,
                Err(e) => {
                    let _ = send(Err(e.to_status())).await;
                    return;
                }
            };
            let summary = pb::QuerySummary {
                rows,
                truncated: truncated.load(Ordering::Acquire),
                elapsed_micros: started.elapsed().as_micros() as u64,
            };
            let _ = send(Ok(piece(end, Some(summary)))).await;
        });
        Ok(tonic::Response::new(stream))
    }
}

fn piece(arrow_ipc: Vec<u8>, summary: Option<pb::QuerySummary>) -> pb::ExecuteResponse {
    pb::ExecuteResponse { arrow_ipc, summary }
}

/// A stream fed by a task, ending when the task drops its sender.
fn async_stream<T, F, Fut>(f: F) -> std::pin::Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Body of `POST /v1/query`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueryRequest {
    pub sql: String,
    /// At most this many rows (the server's limit when lower or absent).
    #[serde(default)]
    pub max_rows: Option<u64>,
}

/// What the HTTP endpoint answers: `Accept: application/json` (the default),
/// `text/csv`, or `application/vnd.apache.arrow.stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

impl Format {
    pub fn from_accept(accept: Option<&str>) -> Option<Format> {
        let Some(accept) = accept else {
            return Some(Format::Json);
        };
        for part in accept.split(',') {
            let media = part.split(';').next().unwrap_or("").trim();
            match media {
                "application/json" | "*/*" | "application/*" => return Some(Format::Json),
                "text/csv" | "text/*" => return Some(Format::Csv),
                ARROW_STREAM => return Some(Format::Arrow),
                _ => {}
            }
        }
        None
    }
}

/// The `authorization` metadata of a gRPC request (`Bearer …`), as the services'
/// [`Access`] takes it.
pub fn authorization<T>(req: &tonic::Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Error body of the HTTP endpoint (the same shape as the control plane's).
#[derive(Debug, Serialize, Deserialize)]
pub struct HttpError {
    pub code: String,
    pub error: String,
}

/// The HTTP answer to a refused or failed request: its status and `HttpError` body.
pub fn fail(e: &QueryError) -> Response {
    let body = HttpError {
        code: e.code().into(),
        error: e.to_string(),
    };
    (e.http_status(), axum::Json(body)).into_response()
}

/// Collects a query's batches (bounded by its row limit).
pub async fn collect(out: QueryOutput) -> Result<(SchemaRef, Vec<RecordBatch>, bool), QueryError> {
    let mut batches = Vec::new();
    let mut s = out.batches;
    while let Some(b) = s.next().await {
        batches.push(b?);
    }
    Ok((out.schema, batches, out.truncated.load(Ordering::Acquire)))
}

/// Encodes batches in `format`. JSON is `{"columns": [...], "rows": [{...}],
/// "truncated": bool}`; binary values are hex strings.
pub fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    truncated: bool,
) -> Result<Vec<u8>, QueryError> {
    use datafusion::arrow::{csv, json};
    let err = QueryError::internal;
    match format {
        Format::Arrow => {
            let mut w = StreamWriter::try_new(Vec::new(), schema).map_err(err)?;
            for b in batches {
                w.write(b).map_err(err)?;
            }
            w.finish().map_err(err)?;
            w.into_inner().map_err(err)
        }
        Format::Csv => {
            let mut w = csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            if batches.is_empty() {
                // A header line even for no rows.
                w.write(&RecordBatch::new_empty(schema.clone()))
                    .map_err(err)?;
            }
            for b in batches {
                w.write(b).map_err(err)?;
            }
            Ok(w.into_inner())
        }
        Format::Json => {
            let mut rows = json::ArrayWriter::new(Vec::new());
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            rows.write_batches(&refs).map_err(err)?;
            rows.finish().map_err(err)?;
            let mut rows = rows.into_inner();
            if rows.is_empty() {
                rows = b"[]".to_vec();
            }
            let columns: Vec<serde_json::Value> = schema
                .fields()
                .iter()
                .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string()}))
                .collect();
            let mut out = Vec::with_capacity(rows.len() + 256);
            out.extend_from_slice(b"{\"columns\":");
            out.extend_from_slice(&serde_json::to_vec(&columns).map_err(QueryError::internal)?);
            out.extend_from_slice(b",\"rows\":");
            out.extend_from_slice(&rows);
            out.extend_from_slice(format!(",\"truncated\":{truncated}}}").as_bytes());
            Ok(out)
        }
    }
}

async fn http_query(
    State(svc): State<QueryService>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(format) =
        Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()))
    else {
        let e = QueryError::Sql(format!(
            "Accept must be application/json, text/csv or {ARROW_STREAM}"
        ));
        return (
            StatusCode::NOT_ACCEPTABLE,
            axum::Json(HttpError {
                code: "not_acceptable".into(),
                error: e.to_string(),
            }),
        )
            .into_response();
    };
    let req: QueryRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return fail(&QueryError::Sql(format!(
                "the body must be JSON like {{\"sql\": \"SELECT …\"}}: {e}"
            )));
        }
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let out = match svc.run(auth, "http", &req.sql, req.max_rows).await {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let (schema, batches, truncated) = match collect(out).await {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    let bytes = match encode(format, &schema, &batches, truncated) {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let content_type = match format {
        Format::Json => "application/json",
        Format::Csv => "text/csv; charset=utf-8",
        Format::Arrow => ARROW_STREAM,
    };
    let mut resp = Response::new(Body::from(bytes));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        "x-cloudtap-truncated",
        HeaderValue::from_static(if truncated { "true" } else { "false" }),
    );
    resp
}
