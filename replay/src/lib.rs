//! Session replay: rebuild a captured session from its records, re-send it, and say
//! what changed (DESIGN: "Who uses it", `cloudtapctl replay`).
//!
//! - [`rebuild`] turns a session's records (read from the log, or from Parquet through
//!   the query service: the same records either way) into a [`Recording`]: the HTTP
//!   exchanges with their requests and recorded responses, and the opaque streams with
//!   their client→server bytes, timings and recorded server→client bytes.
//! - [`plan`] decides what will be sent: the `--only` filter, the requests that may
//!   write (all but GET, HEAD, OPTIONS, TRACE) skipped without `--allow-writes`, and the credentials redaction removed,
//!   restored from `--header` only — never invented. What cannot be restored is a
//!   finding.
//! - [`engine`] sends the plan over connections a [`Dialer`] opens (through the edge's
//!   tunnel in `cloudtapctl`), keeping or compressing the recorded gaps, and compares
//!   every answer with [`diff`].
//! - [`report`] renders the findings for a person or as JSON.
//!
//! Findings are `cloudtap_schemas::ReplayDiff`s: the same values the edge appends to
//! the run's chain and the `replay_diffs` table holds.

pub mod diff;
pub mod engine;
pub mod filter;
pub mod mirrored;
pub mod plan;
pub mod rebuild;
pub mod report;

pub use engine::{Dialer, Io, Progress, RunOptions, Speed, run};
pub use filter::Filter;
pub use plan::{Plan, PlanOptions};
pub use rebuild::Recording;
pub use report::Report;

/// Errors of the replay engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error("the records of session {session} do not rebuild: {reason}")]
    Rebuild { session: String, reason: String },
    #[error("no records for session {0}: it does not exist, or you may not read it")]
    NotFound(String),
    #[error("bad --only filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    /// What is wrong, never the value (it may be a credential).
    #[error("bad --header: {0}; write it as 'Name: value'")]
    Header(String),
    #[error("bad --speed {0:?}: use 1 (recorded pace), N (N times faster) or max")]
    Speed(String),
}

/// Kinds of finding (`replay_diffs.kind`).
pub mod kind {
    pub const STATUS: &str = "status";
    pub const HEADER: &str = "header";
    pub const BODY: &str = "body";
    pub const BYTES: &str = "bytes";
    pub const GRPC_STATUS: &str = "grpc_status";
    pub const GRPC_MESSAGE: &str = "grpc_message";
    pub const FAILED: &str = "failed";
    pub const SKIPPED: &str = "skipped";
    pub const NOT_RESTORED: &str = "not_restored";
    pub const SUMMARY: &str = "summary";

    /// Kinds that are differences (exit code 1), as opposed to notes about the run.
    pub fn is_difference(k: &str) -> bool {
        matches!(
            k,
            STATUS | HEADER | BODY | BYTES | GRPC_STATUS | GRPC_MESSAGE | FAILED
        )
    }
}
