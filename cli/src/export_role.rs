//! The export service, beside the query service: gRPC `ExportService.Export` and HTTP
//! `POST /v1/exports`. It selects sessions as the caller may read them, reads every
//! table's rows of those sessions in full through the query engine, builds and signs
//! the bundle ([`crate::bundle`]) into an unnamed temporary file, and streams that
//! file back. The export key never leaves the process. Every export, refused or not,
//! is an `audit` record with action `export`.

use std::io::{Read, Seek};
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use axum::routing::post;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use cloudtap_edge::EdgeState;
use cloudtap_edge::token::SigningKey;
use cloudtap_proto::query::v1 as pb;
use cloudtap_proto::query::v1::export_service_server::{ExportService, ExportServiceServer};
use cloudtap_query::service::{collect, fail};
use cloudtap_query::{QueryEngine, QueryError, Reader};
use cloudtap_schemas::tables::{self, TABLES};

use crate::bundle::{self, ExportMeta, Selection, Slices};
use crate::query_role::EdgeAccess;

/// The HTTP routes this service adds (method, path), for the API's route list.
pub const HTTP_ROUTES: &[(&str, &str)] = &[("POST", "/v1/exports")];

/// Sessions one export may hold at most.
pub const MAX_SESSIONS: usize = 1000;
const TOO_LARGE: &str = "the bundle is too large";
/// Bytes per streamed piece.
const CHUNK: usize = 256 * 1024;

/// What an export asks for, whichever endpoint it came through.
#[derive(Debug, Clone, Default)]
pub struct ExportAsk {
    pub sessions: Vec<String>,
    pub since_unix_nanos: i64,
    pub until_unix_nanos: i64,
    pub predicate: String,
}

/// A built bundle, waiting in a temporary file.
struct Built {
    file: std::fs::File,
    bytes: u64,
    sessions: Vec<String>,
    manifest_sha256: String,
}

#[derive(Clone)]
pub struct Exporter {
    engine: Arc<QueryEngine>,
    access: Arc<EdgeAccess>,
    key: Option<Arc<SigningKey>>,
}

impl Exporter {
    pub fn new(
        engine: Arc<QueryEngine>,
        state: Arc<EdgeState>,
        key: Option<Arc<SigningKey>>,
    ) -> Self {
        Self {
            engine,
            access: Arc::new(EdgeAccess(state)),
            key,
        }
    }

    pub fn grpc(&self) -> ExportServiceServer<Self> {
        ExportServiceServer::new(self.clone())
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/exports", post(http_export))
            .with_state(self.clone())
    }

    /// Authenticates, builds and records one export.
    async fn export(
        &self,
        authorization: Option<&str>,
        via: &str,
        ask: ExportAsk,
    ) -> Result<Built, QueryError> {
        let reader = self.access.reader_for(authorization, "export").await?;
        let result = self.build(&reader, &ask).await;
        let outcome = match &result {
            Ok(b) => format!(
                "exported {} sessions ({} bytes, manifest sha256 {}): {}",
                b.sessions.len(),
                b.bytes,
                b.manifest_sha256,
                id_list(&b.sessions)
            ),
            Err(e) => format!("refused: {}", e.code()),
        };
        self.access
            .0
            .audit(
                &reader.identity,
                "export",
                format!("via={via} {} outcome={outcome}", describe(&ask)),
            )
            .await;
        result
    }

    async fn build(&self, reader: &Reader, ask: &ExportAsk) -> Result<Built, QueryError> {
        let Some(key) = self.key.clone() else {
            return Err(QueryError::Forbidden(
                "this server has no export key, so it builds no bundles: set [export] key (an Ed25519 seed file) in its configuration".into(),
            ));
        };
        let sessions = self.select(reader, ask).await?;
        // UUIDs in canonical form: nothing else reaches the SQL text.
        let ids = sessions
            .iter()
            .map(|s| format!("'{}'", s.hyphenated()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut statements = Vec::new();
        for table in TABLES {
            let schema = tables::schema_of(table).expect("a known table");
            let cols = schema
                .fields()
                .iter()
                .map(|f| format!("\"{}\"", f.name()))
                .collect::<Vec<_>>()
                .join(", ");
            // Whole chains: a session's own records (not the edge's records about it),
            // and whole replay runs of the sessions that were replays.
            let (filter, order) = match table {
                "sessions" => (
                    format!("session_id IN ({ids}) AND status = 'closed'"),
                    "session_id",
                ),
                "streams" => (
                    format!("session_id IN ({ids}) AND status = 'closed'"),
                    "session_id, stream_id",
                ),
                "replay_diffs" => (format!("replay_session IN ({ids})"), "chain_id, seq"),
                _ => (format!("chain_id IN ({ids})"), "chain_id, seq"),
            };
            statements.push(format!(
                "SELECT {cols} FROM {table} WHERE {filter} ORDER BY {order}"
            ));
        }
        // One snapshot for every table: a session closing meanwhile is either closed in
        // all of them or open in all of them.
        let answers = self.engine.collect_snapshot(reader, &statements).await?;
        let mut slices = Slices::default();
        for (table, batches) in TABLES.iter().zip(answers) {
            let schema = tables::schema_of(table).expect("a known table");
            let mut exact = Vec::with_capacity(batches.len());
            for b in batches {
                exact.push(
                    arrow::array::RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                        .map_err(|e| {
                            QueryError::Internal(format!("{table} rows do not fit its schema: {e}"))
                        })?,
                );
            }
            slices.tables.insert(table.to_string(), exact);
        }
        let late = slices
            .cut_to_whole_chains()
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        if late > 0 {
            tracing::debug!(
                records = late,
                "records appended while the export read its tables are left out"
            );
        }
        let meta = ExportMeta {
            exported_by: reader.identity.clone(),
            selection: selection(ask),
            created_unix_nanos: cloudtap_schemas::now_unix_nanos(),
        };
        let built = tokio::task::spawn_blocking(move || -> Result<Built, String> {
            let mut file = tempfile::tempfile().map_err(|e| format!("no temporary file: {e}"))?;
            let (manifest, manifest_sha256) =
                bundle::write_bundle(&mut file, &slices, &key, &meta).map_err(|e| e.to_string())?;
            let held: u64 = manifest.files.values().map(|f| f.bytes).sum();
            if held > bundle::MAX_BUNDLE_BYTES {
                return Err(format!(
                    "{TOO_LARGE}: it would hold {} MiB, and readers take at most {} GiB; export fewer sessions or a shorter time",
                    held >> 20,
                    bundle::MAX_BUNDLE_BYTES >> 30
                ));
            }
            let bytes = file.stream_position().map_err(|e| e.to_string())?;
            file.rewind().map_err(|e| e.to_string())?;
            Ok(Built {
                file,
                bytes,
                sessions: manifest
                    .sessions
                    .iter()
                    .map(|s| s.session_id.clone())
                    .collect(),
                manifest_sha256,
            })
        })
        .await
        .map_err(|e| QueryError::Internal(format!("the bundle builder failed: {e}")))?
        .map_err(|e| {
            if e.starts_with(TOO_LARGE) {
                QueryError::Limit(e)
            } else {
                QueryError::Internal(format!("cannot build the bundle: {e}"))
            }
        })?;
        Ok(built)
    }

    /// The sessions the ask names, as `reader` may see them.
    async fn select(&self, reader: &Reader, ask: &ExportAsk) -> Result<Vec<Uuid>, QueryError> {
        let filtered = ask.since_unix_nanos != 0
            || ask.until_unix_nanos != 0
            || !ask.predicate.trim().is_empty();
        if ask.sessions.len() > MAX_SESSIONS {
            return Err(QueryError::Limit(format!(
                "{} sessions asked for; one bundle holds at most {MAX_SESSIONS}: export them in parts",
                ask.sessions.len()
            )));
        }
        let mut asked = Vec::new();
        let sql = if !ask.sessions.is_empty() {
            if filtered {
                return Err(QueryError::Sql(
                    "give session ids or filters (since, until, where), not both".into(),
                ));
            }
            let mut ids = Vec::new();
            for s in &ask.sessions {
                let id = Uuid::parse_str(s.trim()).map_err(|_| {
                    QueryError::Sql(format!(
                        "{s:?} is not a session id (a UUID, as `cloudtapctl sessions list` shows)"
                    ))
                })?;
                asked.push(id);
                ids.push(format!("'{}'", id.hyphenated()));
            }
            format!(
                "SELECT DISTINCT session_id FROM sessions WHERE session_id IN ({}) ORDER BY session_id",
                ids.join(", ")
            )
        } else if filtered {
            let mut conds = vec!["TRUE".to_string()];
            if ask.since_unix_nanos != 0 {
                conds.push(format!(
                    "(closed_at IS NULL OR CAST(closed_at AS BIGINT) >= {})",
                    ask.since_unix_nanos
                ));
            }
            if ask.until_unix_nanos != 0 {
                conds.push(format!(
                    "CAST(opened_at AS BIGINT) <= {}",
                    ask.until_unix_nanos
                ));
            }
            if !ask.predicate.trim().is_empty() {
                conds.push(format!("({})", ask.predicate));
            }
            format!(
                "SELECT DISTINCT session_id FROM sessions WHERE {} ORDER BY session_id",
                conds.join(" AND ")
            )
        } else {
            return Err(QueryError::Sql(
                "say which sessions to export: session ids, or --since/--until/--where".into(),
            ));
        };
        let (_, batches, _) = collect(self.engine.execute_whole(reader, &sql).await?).await?;
        let mut found = Vec::new();
        for b in &batches {
            let col = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .ok_or_else(|| QueryError::Internal("session_id is not text".into()))?;
            // A predicate can make the query answer anything: only UUIDs go on.
            for v in col.iter().flatten() {
                found.push(Uuid::parse_str(v).map_err(|_| {
                    QueryError::Sql(format!(
                        "the selection gave {v:?}, not a session id; select sessions with a predicate over the sessions table"
                    ))
                })?);
            }
        }
        found.sort();
        found.dedup();
        let missing: Vec<String> = asked
            .iter()
            .filter(|a| !found.contains(a))
            .map(|a| a.hyphenated().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(QueryError::Forbidden(format!(
                "no session {} that you may read; `cloudtapctl sessions list` shows yours",
                missing.join(", ")
            )));
        }
        if found.is_empty() {
            return Err(QueryError::Sql(
                "no session you may read matches; widen --since/--until or --where".into(),
            ));
        }
        if found.len() > MAX_SESSIONS {
            return Err(QueryError::Limit(format!(
                "{} sessions match; one bundle holds at most {MAX_SESSIONS}: narrow the selection",
                found.len()
            )));
        }
        Ok(found)
    }
}

fn selection(ask: &ExportAsk) -> Selection {
    Selection {
        sessions: ask.sessions.clone(),
        since: (ask.since_unix_nanos != 0).then(|| bundle::rfc3339(ask.since_unix_nanos)),
        until: (ask.until_unix_nanos != 0).then(|| bundle::rfc3339(ask.until_unix_nanos)),
        predicate: (!ask.predicate.trim().is_empty()).then(|| ask.predicate.clone()),
    }
}

/// The ask as the audit record keeps it (the predicate cut to a few KiB).
fn describe(ask: &ExportAsk) -> String {
    let mut p = ask.predicate.clone();
    if p.len() > 2048 {
        let mut end = 2048;
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        p.truncate(end);
        p += " (cut)";
    }
    format!(
        "sessions={} since={} until={} where={p:?}",
        id_list(&ask.sessions),
        ask.since_unix_nanos,
        ask.until_unix_nanos
    )
}

/// Session ids for an audit record: the first 50, and how many there were in all.
fn id_list(ids: &[String]) -> String {
    const SHOWN: usize = 50;
    let mut s = ids
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if ids.len() > SHOWN {
        s += &format!(",… ({} in all)", ids.len());
    }
    s
}

/// Sends the file's pieces; the first message is the header.
fn stream_file(built: Built) -> mpsc::Receiver<Result<pb::ExportChunk, tonic::Status>> {
    let (tx, rx) = mpsc::channel(4);
    let header = pb::ExportHeader {
        bundle_bytes: built.bytes,
        sessions: built.sessions,
        manifest_sha256: built.manifest_sha256,
    };
    let mut file = built.file;
    tokio::task::spawn_blocking(move || {
        if tx
            .blocking_send(Ok(pb::ExportChunk {
                header: Some(header),
                data: Vec::new(),
            }))
            .is_err()
        {
            return;
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(tonic::Status::internal(format!(
                        "reading the built bundle failed: {e}"
                    ))));
                    return;
                }
            };
            let chunk = pb::ExportChunk {
                header: None,
                data: buf[..n].to_vec(),
            };
            if tx.blocking_send(Ok(chunk)).is_err() {
                return; // the client went away
            }
        }
    });
    rx
}

type ExportStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, tonic::Status>> + Send>>;

#[async_trait]
impl ExportService for Exporter {
    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: tonic::Request<pb::ExportRequest>,
    ) -> Result<tonic::Response<Self::ExportStream>, tonic::Status> {
        let auth = cloudtap_query::service::authorization(&request);
        let r = request.into_inner();
        let ask = ExportAsk {
            sessions: r.sessions,
            since_unix_nanos: r.since_unix_nanos,
            until_unix_nanos: r.until_unix_nanos,
            predicate: r.r#where,
        };
        let built = Exporter::export(self, auth.as_deref(), "grpc", ask)
            .await
            .map_err(|e| e.to_status())?;
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(
            stream_file(built),
        ))))
    }
}

/// An RFC 3339 time in unix nanoseconds (0 when absent); the error says what to give.
fn rfc3339_nanos(field: &str, v: &Option<String>) -> Result<i64, String> {
    let Some(v) = v else { return Ok(0) };
    let t = humantime::parse_rfc3339_weak(v)
        .map_err(|e| format!("{field}: {e}; give an RFC 3339 time such as 2026-11-25T10:00:00Z"))?;
    unix_nanos(t).ok_or_else(|| format!("{field}: {v} is outside 1970 to 2262"))
}

/// Unix nanoseconds of `t`, when it fits (1970 to 2262).
pub fn unix_nanos(t: std::time::SystemTime) -> Option<i64> {
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok().filter(|n| *n > 0)
}

async fn http_export(
    State(x): State<Exporter>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let req: Selection = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return fail(&QueryError::Sql(format!(
                "the body must be JSON like {{\"sessions\": [\"<id>\"]}} or {{\"since\": \"2026-11-25T10:00:00Z\", \"where\": \"target = 'orders'\"}}: {e}"
            )));
        }
    };
    let (since, until) = match (
        rfc3339_nanos("since", &req.since),
        rfc3339_nanos("until", &req.until),
    ) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return fail(&QueryError::Sql(e)),
    };
    let ask = ExportAsk {
        sessions: req.sessions,
        since_unix_nanos: since,
        until_unix_nanos: until,
        predicate: req.predicate.unwrap_or_default(),
    };
    let built = match x.export(auth, "http", ask).await {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let len = built.bytes;
    let sessions = built.sessions.len();
    let sha = built.manifest_sha256.clone();
    let file = tokio::fs::File::from_std(built.file);
    let body = HttpBody::from_stream(tokio_util::io::ReaderStream::with_capacity(file, CHUNK));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"incident.tar.zst\""),
    );
    h.insert("x-cloudtap-sessions", HeaderValue::from(sessions));
    if let Ok(v) = HeaderValue::from_str(&sha) {
        h.insert("x-cloudtap-manifest-sha256", v);
    }
    resp
}
