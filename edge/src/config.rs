//! Edge configuration: one TOML file (every field documented in the README's
//! configuration reference), plus `--target NAME=HOST:PORT` flags merged in by the
//! binary. Validation is pure; nothing here touches the network or disk.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Name of this edge (the writer of its sessions' chains). Default `edge`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Traffic log URL: `file:///path` (default `<data dir>/log`).
    #[serde(default)]
    pub log: Option<String>,
    #[serde(default)]
    pub log_fsync: FsyncSetting,
    /// Group-commit window in microseconds (0: groups form while an fsync runs).
    #[serde(default)]
    pub log_group_commit_us: u64,
    /// New sessions are refused while the local log's filesystem has less free space
    /// than this, in MiB (default 512).
    #[serde(default = "default_min_free_mb")]
    pub log_min_free_mb: u64,
    /// Archived segments of the local log older than this many hours are removed
    /// (default 24; 0 keeps them).
    #[serde(default = "default_retention_hours")]
    pub log_retention_hours: u64,
    /// … and archived segments go while the local log is larger than this many MiB
    /// (default 1024; 0: no size bound).
    #[serde(default = "default_retention_mb")]
    pub log_retention_mb: u64,
    /// Certificates; default: the development PKI in `<data dir>/pki`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub tokens: TokenSettings,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The recorder role: archive location and range cutting.
    #[serde(default)]
    pub recorder: cloudtap_recorder::archive::RecorderConfig,
    /// What HTTP mirroring keeps of bodies, and its queue.
    #[serde(default)]
    pub capture: CaptureSettings,
    /// Rules that remove secrets from exchange records before they are logged.
    #[serde(default)]
    pub redaction: RedactionConfig,
    /// OpenTelemetry export of exchanges as spans.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Limits of the query service (`cloudtapd all` / `cloudtapd query`).
    #[serde(default)]
    pub query: QueryConfig,
    /// The replay service (`cloudtapd all` / `cloudtapd replay`).
    #[serde(default)]
    pub replay: ReplayConfig,
    /// Incident bundles (`cloudtapctl export`), built by the query service.
    #[serde(default)]
    pub export: ExportConfig,
}

/// `[export]`: the key bundles are signed with. Not the token issuer key: a CLI that
/// trusts bundles need not trust tokens. Without `key`, the embedded default and a
/// node beside it use the development one (`<data dir>/pki/export-signing.key`); a
/// configured deployment without it refuses exports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Ed25519 seed (64 hex digits) file; its public half goes to the CLIs' config.
    pub key: Option<PathBuf>,
}

/// `[replay]`: the replay service's own identity: a client certificate (and key) the
/// edge's CA issued; its subject names the identity policy grants. Without them the
/// embedded default issues one for `cloudtap-replay` from the development CA, and a
/// configured deployment runs no replay service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Per target, `Name: value` headers the service sets on every replayed request:
    /// the credentials redaction removed from recordings, given once here instead of
    /// with every run. A run's own `headers` win over these by name.
    #[serde(default)]
    pub headers: ReplayHeaders,
}

/// `[replay.headers]`: target → headers. Secrets: never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ReplayHeaders(pub std::collections::BTreeMap<String, Vec<String>>);

impl std::fmt::Debug for ReplayHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(t, h)| (t, format!("{} headers (not shown)", h.len()))),
            )
            .finish()
    }
}

/// `[query]`: limits every SQL query runs under.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// A query running longer is stopped. Default 60.
    #[serde(default = "default_query_timeout")]
    pub timeout_secs: u64,
    /// Memory one query may hold for sorts, joins and aggregations; beyond it the
    /// query fails with a message saying so. Default 1024.
    #[serde(default = "default_query_memory")]
    pub memory_limit_mb: u64,
    /// Rows one answer holds at most; the rest are cut and the answer says so.
    /// Default 100000.
    #[serde(default = "default_query_rows")]
    pub max_rows: u64,
    /// Log records not yet archived that one query may read into memory. Default 512.
    #[serde(default = "default_query_tail")]
    pub max_tail_mb: u64,
}

fn default_query_timeout() -> u64 {
    60
}

fn default_query_memory() -> u64 {
    1024
}

fn default_query_rows() -> u64 {
    100_000
}

fn default_query_tail() -> u64 {
    512
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout_secs: default_query_timeout(),
            memory_limit_mb: default_query_memory(),
            max_rows: default_query_rows(),
            max_tail_mb: default_query_tail(),
        }
    }
}

/// `[telemetry]`: OTLP export (off unless `otlp_endpoint` is set).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans' resource. Default `cloudtap-edge`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export; when full, new spans are dropped and counted.
    /// Default 4096.
    #[serde(default = "default_span_queue")]
    pub queue: usize,
}

fn default_service_name() -> String {
    "cloudtap-edge".into()
}

fn default_span_queue() -> usize {
    4096
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
            queue: default_span_queue(),
        }
    }
}

/// HTTP mirroring settings shared by every route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSettings {
    /// Bodies are kept up to this many bytes (decoded); larger ones keep their size and
    /// hash and are marked truncated. Default 65536.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Chunks waiting for a stream's HTTP parser. When full, a `block` route waits;
    /// other routes stop mirroring that stream (an event says so). Default 256.
    #[serde(default = "default_mirror_queue")]
    pub mirror_queue: usize,
}

fn default_max_body() -> usize {
    64 * 1024
}

fn default_mirror_queue() -> usize {
    256
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            mirror_queue: default_mirror_queue(),
        }
    }
}

/// Redaction rules (DESIGN: "Capture levels and redaction"). Versioned: every exchange
/// record carries the `version` it was redacted under, so bump it whenever the rules
/// change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    /// Default 1.
    #[serde(default = "default_redaction_version")]
    pub version: u32,
    /// Whether the built-in rules apply as well (header names, field names and
    /// patterns listed in the README). Default true.
    #[serde(default = "yes")]
    pub builtin: bool,
    /// More header names whose values are removed (case-insensitive).
    #[serde(default)]
    pub headers: Vec<String>,
    /// More JSON / form / query field names whose values are removed, anywhere
    /// (case-insensitive; `-` and `_` ignored).
    #[serde(default)]
    pub fields: Vec<String>,
    /// JSON paths whose values are removed: `$.user.ssn`, `$.cards[*].number`, `$.*.pin`.
    #[serde(default)]
    pub json_paths: Vec<String>,
    /// More regular expressions (Rust `regex` syntax) whose matches are removed from
    /// header values, paths, queries and text bodies.
    #[serde(default)]
    pub patterns: Vec<String>,
}

fn default_redaction_version() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl Default for RedactionConfig {
    fn default() -> Self {
        Self {
            version: default_redaction_version(),
            builtin: true,
            headers: Vec::new(),
            fields: Vec::new(),
            json_paths: Vec::new(),
            patterns: Vec::new(),
        }
    }
}

fn default_name() -> String {
    "edge".into()
}

fn default_min_free_mb() -> u64 {
    512
}

fn default_retention_hours() -> u64 {
    24
}

fn default_retention_mb() -> u64 {
    1024
}

impl EdgeConfig {
    /// Retention of the local log's archived segments.
    pub fn log_retention(&self) -> cloudtap_recorder::Retention {
        cloudtap_recorder::Retention {
            max_age: (self.log_retention_hours > 0)
                .then(|| Duration::from_secs(self.log_retention_hours * 3600)),
            max_bytes: (self.log_retention_mb > 0).then(|| self.log_retention_mb * 1024 * 1024),
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        toml::from_str("").expect("empty config is valid")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncSetting {
    /// fsync every group commit (default).
    #[default]
    Group,
    /// Never fsync (tmpfs, benchmarks): a machine crash loses acknowledged records.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that client certificates must chain to.
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// Lifetime of user tokens from `login`, seconds (default 900).
    pub user_ttl_secs: u64,
    /// Lifetime of session tokens, seconds (default 900); tunnels renew before expiry.
    pub session_ttl_secs: u64,
    /// Upper bound for any token (`token issue --ttl`), seconds (default 86400).
    pub max_ttl_secs: u64,
    /// Ed25519 seed (hex) file of the issuer; default `<data dir>/pki/token-signing.key`.
    pub signing_key: Option<PathBuf>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            user_ttl_secs: 900,
            session_ttl_secs: 900,
            max_ttl_secs: 86_400,
            signing_key: None,
        }
    }
}

/// Resource limits. Memory per tunnel is bounded by the yamux connection window
/// (each stream's receive window starts at 256 KiB and grows within it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Live tunnels per edge (default 1024).
    pub max_tunnels: usize,
    /// Concurrent streams per tunnel (default 1024).
    pub max_streams_per_tunnel: usize,
    /// yamux connection receive window in bytes (default 256 MiB = 256 KiB × 1024
    /// streams). Must be at least 256 KiB × `max_streams_per_tunnel`.
    pub connection_window_bytes: usize,
    /// TLS handshake plus hello must finish within this (default 10 s).
    pub handshake_timeout_secs: u64,
    /// A stream with no bytes either way for this long is closed (default 3600 s; 0 = never).
    pub idle_timeout_secs: u64,
    /// Connecting to an upstream must finish within this (default 10 s).
    pub connect_timeout_secs: u64,
    /// Records the tap buffers between forwarding and the log (default 1024).
    pub tap_capacity: usize,
    /// Heartbeat interval on the edge's own chain (default 10 s).
    pub heartbeat_secs: u64,
}

pub const YAMUX_STREAM_WINDOW: usize = 256 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tunnels: 1024,
            max_streams_per_tunnel: 1024,
            connection_window_bytes: 1024 * YAMUX_STREAM_WINDOW,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 3600,
            connect_timeout_secs: 10,
            tap_capacity: 1024,
            heartbeat_secs: 10,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }
}

/// What forwarding does when the tap's buffer is full (DESIGN: "Processes and data flow").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backpressure {
    /// Forwarding waits; nothing is dropped while the edge runs.
    #[default]
    Block,
    /// Forwarding continues; a gap record counts what was not logged.
    Drop,
    /// A chunk is forwarded only after its record is durable.
    Strict,
}

impl Backpressure {
    pub fn as_str(self) -> &'static str {
        match self {
            Backpressure::Block => "block",
            Backpressure::Drop => "drop",
            Backpressure::Strict => "strict",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `host:port`; the edge resolves it itself and pins the address per stream.
    pub upstream: String,
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    #[serde(default)]
    pub on_log_backpressure: Backpressure,
    /// What the route carries: `auto` (default: HTTP/1.x or HTTP/2 — gRPC included —
    /// from the client's first bytes, otherwise opaque TCP), `http1`, `http2` (or
    /// `grpc`), or `tcp` (never parsed).
    #[serde(default)]
    pub protocol: Protocol,
    /// What is kept: `full`, `exchanges` or `metadata`. Default: `exchanges` for HTTP
    /// streams, `full` for opaque ones (DESIGN: "Capture levels and redaction").
    #[serde(default)]
    pub capture: Option<CaptureLevel>,
    /// Method and path rules checked inline on every HTTP/1.x request head before it is
    /// forwarded; the first match decides, and with any rule present no match denies.
    /// Streams that are not HTTP/1.x are refused on such a route.
    #[serde(default)]
    pub http_rules: Vec<HttpRule>,
}

/// One method/path rule: `{ action = "allow", methods = ["GET"], paths = ["/api/**"] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRule {
    pub action: RuleAction,
    /// Methods it applies to (any when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path globs it applies to (any when empty): `*` within a segment, `**` across.
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Auto,
    Http1,
    /// HTTP/2 with prior knowledge (h2c); `grpc` is the same.
    #[serde(alias = "grpc")]
    Http2,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureLevel {
    /// Frames carry the payload exactly as forwarded.
    Full,
    /// Frames without payload, plus exchange records with headers and bodies, redacted.
    Exchanges,
    /// Frames and exchange records without headers or bodies.
    Metadata,
}

impl CaptureLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureLevel::Full => "full",
            CaptureLevel::Exchanges => "exchanges",
            CaptureLevel::Metadata => "metadata",
        }
    }
}

/// TLS originated by the edge towards the upstream (HTTPS staging services).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name to send and verify; default: the upstream's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// CA bundle to verify the upstream with (PEM). Required unless `insecure_skip_verify`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Development only: do not verify the upstream's certificate.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Deny-by-default access policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Identities allowed to issue and revoke tokens and close anyone's tunnels.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Identities that may read every captured session (`query`, `sessions`,
    /// `tail`), including the edges' own records, without other admin rights.
    #[serde(default)]
    pub auditors: Vec<String>,
    /// Named groups of identities, referenced as `group:NAME` in rules.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Identities (certificate CN / SAN), `group:NAME`, or `*`.
    pub identities: Vec<String>,
    /// Target names, or `*`.
    pub targets: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl EdgeConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pure checks: names, addresses, limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.query;
        if q.timeout_secs == 0 || q.memory_limit_mb == 0 || q.max_rows == 0 {
            return Err(ConfigError(
                "[query]: timeout_secs, memory_limit_mb and max_rows must be at least 1".into(),
            ));
        }
        let mut seen = HashSet::new();
        for t in &self.targets {
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError(format!(
                    "target name {:?} must be non-empty and use only letters, digits, '-', '_' or '.'",
                    t.name
                )));
            }
            if !seen.insert(&t.name) {
                return Err(ConfigError(format!("target {:?} is defined twice", t.name)));
            }
            parse_host_port(&t.upstream).map_err(|e| {
                ConfigError(format!(
                    "target {:?}: upstream {:?} {e}",
                    t.name, t.upstream
                ))
            })?;
            if let Some(tls) = &t.tls
                && tls.ca.is_none()
                && !tls.insecure_skip_verify
            {
                return Err(ConfigError(format!(
                    "target {:?}: upstream TLS needs `ca = \"path.pem\"` (or insecure_skip_verify = true for development)",
                    t.name
                )));
            }
        }
        for t in &self.targets {
            for (i, r) in t.http_rules.iter().enumerate() {
                if let Some(m) = r
                    .methods
                    .iter()
                    .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
                {
                    return Err(ConfigError(format!(
                        "target {:?}: http_rules[{i}]: {m:?} is not an HTTP method",
                        t.name
                    )));
                }
                if let Some(p) = r.paths.iter().find(|p| !p.starts_with('/') && *p != "**") {
                    return Err(ConfigError(format!(
                        "target {:?}: http_rules[{i}]: path {p:?} must start with '/' (or be \"**\")",
                        t.name
                    )));
                }
            }
            if !t.http_rules.is_empty() && t.protocol == Protocol::Tcp {
                return Err(ConfigError(format!(
                    "target {:?}: http_rules need an HTTP route; protocol is \"tcp\"",
                    t.name
                )));
            }
        }
        crate::mirror::redact::Redactor::new(&self.redaction)
            .map_err(|e| ConfigError(format!("[redaction]: {e}")))?;
        if let Some(e) = &self.telemetry.otlp_endpoint
            && !e.starts_with("http://")
        {
            return Err(ConfigError(format!(
                "telemetry.otlp_endpoint {e:?}: only plaintext OTLP/gRPC (http://…) is in this build; run a collector or agent on the edge's host or network and point this at it"
            )));
        }
        if self.telemetry.queue == 0 {
            return Err(ConfigError(
                "telemetry.queue must be greater than zero".into(),
            ));
        }
        if self.capture.mirror_queue == 0 {
            return Err(ConfigError(
                "capture.mirror_queue must be greater than zero".into(),
            ));
        }
        let l = &self.limits;
        if l.max_streams_per_tunnel == 0 || l.max_tunnels == 0 || l.tap_capacity == 0 {
            return Err(ConfigError("limits must be greater than zero".into()));
        }
        let need = YAMUX_STREAM_WINDOW.saturating_mul(l.max_streams_per_tunnel);
        if l.connection_window_bytes < need {
            return Err(ConfigError(format!(
                "limits.connection_window_bytes = {} is below 256 KiB × max_streams_per_tunnel = {need}; raise it or lower max_streams_per_tunnel",
                l.connection_window_bytes
            )));
        }
        let t = &self.tokens;
        if t.user_ttl_secs == 0 || t.session_ttl_secs < 10 {
            return Err(ConfigError(
                "tokens: user_ttl_secs must be > 0 and session_ttl_secs ≥ 10".into(),
            ));
        }
        if t.user_ttl_secs > t.max_ttl_secs || t.session_ttl_secs > t.max_ttl_secs {
            return Err(ConfigError("tokens: a ttl is above max_ttl_secs".into()));
        }
        if self.policy.groups.keys().any(String::is_empty) {
            return Err(ConfigError("policy.groups: empty group name".into()));
        }
        Ok(())
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Splits `host:port` (IPv6 in brackets) without resolving it.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s.rsplit_once(':').ok_or("must be host:port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("has an invalid port {port:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err("must be host:port with a non-zero port".into());
    }
    Ok((host.to_string(), port))
}

/// Parses a `--target NAME=HOST:PORT` flag.
pub fn parse_target_flag(s: &str) -> Result<TargetConfig, ConfigError> {
    let (name, upstream) = s
        .split_once('=')
        .ok_or_else(|| ConfigError(format!("--target {s:?}: expected NAME=HOST:PORT")))?;
    Ok(TargetConfig {
        name: name.trim().into(),
        upstream: upstream.trim().into(),
        tls: None,
        protocol: Default::default(),
        capture: None,
        http_rules: Vec::new(),
        on_log_backpressure: Backpressure::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let cfg = EdgeConfig::from_toml(
            r#"
            name = "edge-a"
            [limits]
            max_streams_per_tunnel = 8
            connection_window_bytes = 2097152
            [[targets]]
            name = "db"
            upstream = "db.staging:5432"
            on_log_backpressure = "strict"
            [[targets]]
            name = "web"
            upstream = "[::1]:443"
            tls = { sni = "web.staging", insecure_skip_verify = true }
            [policy]
            admins = ["root"]
            groups = { dev = ["alice", "bob"] }
            [[policy.rules]]
            identities = ["group:dev"]
            targets = ["db"]
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.target("db").unwrap().on_log_backpressure,
            Backpressure::Strict
        );
        assert_eq!(cfg.tokens.user_ttl_secs, 900);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (text, needle) in [
            ("bogus = 1", "unknown field"),
            ("[[targets]]\nname='a'\nupstream='nope'", "host:port"),
            (
                "[[targets]]\nname='a'\nupstream='h:1'\n[[targets]]\nname='a'\nupstream='h:2'",
                "twice",
            ),
            (
                "[limits]\nmax_streams_per_tunnel = 2048",
                "connection_window_bytes",
            ),
            ("[[targets]]\nname='a'\nupstream='h:1'\ntls = {}", "ca ="),
        ] {
            let err = EdgeConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
