//! The query role's wiring: the engine over this process's archive and log, and the
//! edge's control plane as its [`Access`] (same tokens, policy and audit chain).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use cloudtap_edge::EdgeState;
use cloudtap_edge::config::{EdgeConfig, QueryConfig};
use cloudtap_edge::control::{Caller, ErrorKind};
use cloudtap_edge::token::SigningKey;
use cloudtap_query::flight::FlightSql;
use cloudtap_query::service::{Access, QueryService};
use cloudtap_query::{QueryEngine, QueryError, QuerySettings, Reader, Scope};
use cloudtap_recorder::EventLog;
use cloudtap_recorder::store::ObjectStore;

use crate::export_role::Exporter;

/// The SQL text kept in a query's audit record, at most.
const AUDIT_SQL_BYTES: usize = 4096;

pub fn settings(q: &QueryConfig) -> QuerySettings {
    QuerySettings {
        timeout: Duration::from_secs(q.timeout_secs),
        memory_limit: (q.memory_limit_mb * 1024 * 1024) as usize,
        max_rows: q.max_rows,
        max_tail_bytes: q.max_tail_mb * 1024 * 1024,
        ..QuerySettings::default()
    }
}

/// The engine over `archive_url` (read through the recorder's store for markers, and
/// through object_store for Parquet) and `log`'s tail.
pub fn engine(
    cfg: &EdgeConfig,
    archive_url: &str,
    archive: Arc<dyn ObjectStore>,
    log: Arc<dyn EventLog>,
) -> anyhow::Result<Arc<QueryEngine>> {
    let files = cloudtap_query::engine::datafusion_store(archive_url, &cfg.recorder.s3)?;
    Ok(Arc::new(QueryEngine::new(
        archive,
        files,
        Some(log),
        settings(&cfg.query),
    )?))
}

/// The control plane as the query service's gatekeeper.
pub struct EdgeAccess(pub Arc<EdgeState>);

impl EdgeAccess {
    /// The reader `authorization` names, for `action` (what a refusal is audited as).
    pub async fn reader_for(
        &self,
        authorization: Option<&str>,
        action: &str,
    ) -> Result<Reader, QueryError> {
        let caller = Caller::from_authorization(authorization);
        let grant = self
            .0
            .read_grant(&caller, action)
            .await
            .map_err(|r| match r.kind() {
                ErrorKind::Unauthenticated => QueryError::Unauthenticated(r.to_string()),
                _ => QueryError::Forbidden(r.to_string()),
            })?;
        let scope = if grant.all {
            Scope::All
        } else {
            Scope::Sessions {
                identity: grant.identity.clone(),
                targets: grant.targets,
            }
        };
        Ok(Reader {
            identity: grant.identity,
            scope,
        })
    }
}

#[async_trait]
impl Access for EdgeAccess {
    async fn reader(&self, authorization: Option<&str>) -> Result<Reader, QueryError> {
        self.reader_for(authorization, "query").await
    }

    async fn record(&self, reader: &Reader, via: &str, sql: &str, outcome: &str) {
        let mut end = sql.len().min(AUDIT_SQL_BYTES);
        while !sql.is_char_boundary(end) {
            end -= 1;
        }
        let cut = if end < sql.len() { " (cut)" } else { "" };
        self.0
            .audit(
                &reader.identity,
                "query",
                format!("via={via} outcome={outcome} sql={}{cut}", &sql[..end]),
            )
            .await;
    }
}

/// The query service's HTTP routes and gRPC services (QueryService, Flight SQL and
/// the export service, which signs bundles with `export_key`), authenticated by
/// `state`.
pub fn mounts(
    engine: Arc<QueryEngine>,
    state: Arc<EdgeState>,
    export_key: Option<Arc<SigningKey>>,
) -> cloudtap_edge::Mounts {
    let svc = QueryService::new(engine.clone(), Arc::new(EdgeAccess(state.clone())));
    let flight = FlightSql::new(svc.clone());
    let export = Exporter::new(engine, state, export_key);
    cloudtap_edge::Mounts {
        http: Some(svc.router().merge(export.router())),
        grpc: Some(
            tonic::service::Routes::new(svc.grpc())
                .add_service(flight.grpc())
                .add_service(export.grpc()),
        ),
    }
}

/// The export key `[export] key` names; else, where `dev` allows, the development one
/// when it exists; else none (exports are refused, saying why).
pub fn export_key(
    cfg: &EdgeConfig,
    data_dir: &std::path::Path,
    dev: bool,
) -> anyhow::Result<Option<Arc<SigningKey>>> {
    let path = match &cfg.export.key {
        Some(p) => p.clone(),
        None if dev => cloudtap_edge::pki::DevPki::new(data_dir).export_key(),
        None => return Ok(None),
    };
    if cfg.export.key.is_none() && !path.exists() {
        return Ok(None);
    }
    let seed = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the export key {}", path.display()))?;
    let key = SigningKey::from_seed_hex(&seed).with_context(|| format!("in {}", path.display()))?;
    Ok(Some(Arc::new(key)))
}
