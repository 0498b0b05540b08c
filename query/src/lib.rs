//! cloudtap query: SQL over captured traffic.
//!
//! [`engine::QueryEngine`] builds a DataFusion context per query over the recorder's
//! Parquet tables (only files a commit marker lists) and the records the log holds
//! beyond the last marker, scoped to what the reader may see ([`engine::Scope`]).
//! [`service`] serves it: gRPC `QueryService.Execute` (Arrow IPC), HTTP
//! `POST /v1/query` (JSON, CSV or Arrow IPC), and Arrow Flight SQL ([`flight`]), all
//! behind one [`service::Access`] that authenticates callers and records each query.

pub mod engine;
pub mod flight;
pub mod functions;
pub mod service;
pub mod tables;

pub use engine::{QueryEngine, QueryOutput, QuerySettings, Reader, Scope};

use datafusion::error::DataFusionError;

/// Why a query did not run. Messages say what to do next and never echo secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// The SQL does not parse or plan (DataFusion's message, with its position).
    #[error("{0}")]
    Sql(String),
    #[error("{name:?} is not a table here; the tables are: {}", engine::QUERYABLE.join(", "))]
    UnknownTable { name: String, detail: String },
    #[error(
        "the query service is read-only: only queries run here (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); CREATE, INSERT, COPY, SET and other statements are refused"
    )]
    ReadOnly,
    #[error("the query ran longer than {}s; narrow it (WHERE on session_id, ts or date) or raise [query] timeout_secs", .0.as_secs())]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Limit(String),
    #[error("the archive is unreachable: {0}")]
    Archive(String),
    #[error("the traffic log is unreadable: {0}")]
    Log(String),
    #[error("query failed: {0}")]
    Execution(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl QueryError {
    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        QueryError::Internal(e.to_string())
    }

    /// Errors while parsing and planning: bad SQL, unknown tables and columns.
    pub(crate) fn from_planning(e: DataFusionError, sql: &str) -> Self {
        if let DataFusionError::SQL(p, _) = e.find_root() {
            let text = p.to_string();
            let text = text.strip_prefix("sql parser error: ").unwrap_or(&text);
            if text.contains("at Line: ") {
                return QueryError::Sql(format!("syntax error: {text}"));
            }
            // The parser gives no position when the statement ended too soon.
            let trimmed = sql.trim_end();
            let line = trimmed.matches('\n').count() + 1;
            let column = trimmed.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            return QueryError::Sql(format!(
                "syntax error: {text} at the end of the statement (Line: {line}, Column: {column})"
            ));
        }
        let e = e.find_root().to_string();
        if let Some(name) = unknown_table(&e) {
            return QueryError::UnknownTable {
                name,
                detail: e.clone(),
            };
        }
        if e.contains("not supported") && (e.contains("DDL") || e.contains("DML")) {
            return QueryError::ReadOnly;
        }
        QueryError::Sql(e)
    }

    pub(crate) fn from_execution(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::ResourcesExhausted(m) => QueryError::Limit(format!(
                "the query needed more memory than its limit allows ({m}); narrow it (WHERE on session_id, ts or date), aggregate less, or raise [query] memory_limit_mb"
            )),
            DataFusionError::ObjectStore(o) => QueryError::Archive(o.to_string()),
            other => QueryError::Execution(other.to_string()),
        }
    }

    /// A stable code for clients (HTTP body `code`, gRPC message prefix).
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::Unauthenticated(_) => "unauthenticated",
            QueryError::Forbidden(_) => "forbidden",
            QueryError::Sql(_) => "bad_sql",
            QueryError::UnknownTable { .. } => "unknown_table",
            QueryError::ReadOnly => "read_only",
            QueryError::Timeout(_) => "timeout",
            QueryError::Limit(_) => "limit",
            QueryError::Archive(_) => "archive_unavailable",
            QueryError::Log(_) => "log_unavailable",
            QueryError::Execution(_) => "execution",
            QueryError::Internal(_) => "internal",
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            QueryError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            QueryError::Forbidden(_) => tonic::Code::PermissionDenied,
            QueryError::Sql(_) | QueryError::UnknownTable { .. } | QueryError::ReadOnly => {
                tonic::Code::InvalidArgument
            }
            QueryError::Timeout(_) => tonic::Code::DeadlineExceeded,
            QueryError::Limit(_) => tonic::Code::ResourceExhausted,
            QueryError::Archive(_) | QueryError::Log(_) => tonic::Code::Unavailable,
            QueryError::Execution(_) | QueryError::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            QueryError::Unauthenticated(_) => S::UNAUTHORIZED,
            QueryError::Forbidden(_) => S::FORBIDDEN,
            QueryError::Sql(_) | QueryError::UnknownTable { .. } | QueryError::ReadOnly => {
                S::BAD_REQUEST
            }
            QueryError::Timeout(_) => S::GATEWAY_TIMEOUT,
            QueryError::Limit(_) => S::UNPROCESSABLE_ENTITY,
            QueryError::Archive(_) | QueryError::Log(_) => S::SERVICE_UNAVAILABLE,
            QueryError::Execution(_) | QueryError::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.grpc_code(), format!("{}: {self}", self.code()))
    }
}

/// The table name in DataFusion's "table 'datafusion.public.x' not found".
fn unknown_table(msg: &str) -> Option<String> {
    let rest = msg.split("table '").nth(1)?;
    let (name, after) = rest.split_once('\'')?;
    if !after.trim_start().starts_with("not found") {
        return None;
    }
    Some(name.rsplit('.').next().unwrap_or(name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_table_names_the_table() {
        assert_eq!(
            unknown_table("Error during planning: table 'datafusion.public.framez' not found"),
            Some("framez".into())
        );
        assert_eq!(unknown_table("Schema error: No field named x"), None);
    }
}
