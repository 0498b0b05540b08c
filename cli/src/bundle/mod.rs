//! Incident bundles: one signed `.tar.zst` holding what was stored of some sessions,
//! readable by the tools people already have (DuckDB for the Parquet slices, browser
//! devtools for `exchanges.har`, Wireshark for `capture.pcapng`), verifiable offline,
//! and loadable into another store.
//!
//! Members, in archive order:
//!
//! - `manifest.json`: format version, cloudtap version, selection, sessions (with each
//!   chain's record count and last hash), time range, record counts, capture levels,
//!   redaction rule versions, and the SHA-256 of every other member;
//! - `manifest.sig`: the 64-byte Ed25519 signature over the exact bytes of
//!   `manifest.json`, by the server's export key;
//! - `README.txt`, `events.jsonl`, `exchanges.har`, `capture.pcapng`;
//! - `tables/<table>.parquet` for every table, rows exactly as stored (`seq`,
//!   `prev_hash`, `record_hash` included), so every chain verifies from seq 0.
//!
//! Nothing is re-redacted or changed on the way: a bundle holds what the store held.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use arrow::array::{BooleanArray, RecordBatch, StringArray, TimestampNanosecondArray, UInt64Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use cloudtap_edge::token::{SigningKey, VerifyingKey};
use cloudtap_schemas::tables::{self, TABLES, TABLES_VERSION, VERSION_KEY};
use cloudtap_schemas::{Body, Record, verify_chain};

pub mod har;
pub mod import;
pub mod pcap;

/// `manifest.json`'s `format`.
pub const FORMAT: &str = "cloudtap-bundle";
/// Bumped when members or manifest fields change meaning; readers refuse newer ones.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.sig";
pub const README: &str = "README.txt";
pub const EVENTS: &str = "events.jsonl";
pub const HAR: &str = "exchanges.har";
pub const PCAP: &str = "capture.pcapng";

/// The tables whose rows are records (and so belong to a hash chain).
pub const RECORD_TABLES: [&str; 4] = ["events", "frames", "http_exchanges", "replay_diffs"];

pub fn table_member(table: &str) -> String {
    format!("tables/{table}.parquet")
}

/// What the exporter asked for, as the manifest repeats it; also the body of
/// `POST /v1/exports` (times in RFC 3339).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub predicate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSession {
    pub session_id: String,
    pub identity: String,
    pub target: String,
    pub opened_at: String,
    /// Absent while the session was still open at export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replay_of: String,
    /// Records of the session's chain in the bundle (seq 0 to `last_seq`).
    pub records: u64,
    pub last_seq: u64,
    /// Hex `record_hash` of the chain's last record: the chain ends here.
    pub last_record_hash: String,
    pub capture_levels: Vec<String>,
    pub redaction_versions: Vec<u32>,
}

/// A chain that is no session of its own: a replay run's findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestChain {
    pub chain_id: String,
    pub records: u64,
    pub last_seq: u64,
    pub last_record_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub cloudtap_version: String,
    pub tables_version: u32,
    pub created_at: String,
    /// The identity that asked for the export.
    pub exported_by: String,
    /// Hex Ed25519 public half of the key that signed `manifest.json`.
    pub export_key: String,
    pub selection: Selection,
    /// First and last record timestamps (RFC 3339), absent for an empty bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_record_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record_at: Option<String>,
    pub sessions: Vec<ManifestSession>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_chains: Vec<ManifestChain>,
    /// Rows per table.
    pub record_counts: BTreeMap<String, u64>,
    pub capture_levels: Vec<String>,
    pub redaction_versions: Vec<u32>,
    /// Every member but `manifest.json` and `manifest.sig`.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Build(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn build_err(e: impl std::fmt::Display) -> BundleError {
    BundleError::Build(e.to_string())
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(ns: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One table as Parquet, zstd-compressed, carrying the tables version like the
/// recorder's files.
pub fn parquet_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, BundleError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(build_err)?))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            VERSION_KEY.to_string(),
            TABLES_VERSION.to_string(),
        )]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema.clone(), Some(props)).map_err(build_err)?;
    for b in batches {
        w.write(b).map_err(build_err)?;
    }
    w.close().map_err(build_err)?;
    Ok(out)
}

/// The batches of a Parquet member.
pub fn read_parquet(name: &str, bytes: &[u8]) -> Result<Vec<RecordBatch>, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(bytes))
        .and_then(|b| b.build())
        .map_err(|e| format!("{name} is not readable Parquet: {e}"))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{name} is not readable Parquet: {e}"))
}

/// What the server read for an export: every table's rows, already scoped and
/// selected, with exactly the table's columns.
#[derive(Debug, Default)]
pub struct Slices {
    pub tables: BTreeMap<String, Vec<RecordBatch>>,
}

/// The records of the record tables `table` gives, ordered by chain and seq.
fn records_of(
    mut table: impl FnMut(&str) -> Result<Vec<RecordBatch>, String>,
) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for t in RECORD_TABLES {
        for b in table(t)? {
            out.extend(
                tables::records_from_batch(&b).map_err(|e| format!("{}: {e}", table_member(t)))?,
            );
        }
    }
    out.sort_by_key(|a| (a.chain_id, a.seq));
    Ok(out)
}

impl Slices {
    /// The records of the record tables, ordered by chain and seq.
    pub fn records(&self) -> Result<Vec<Record>, BundleError> {
        records_of(|t| Ok(self.tables.get(t).cloned().unwrap_or_default())).map_err(build_err)
    }

    /// Keeps each chain from seq 0 up to its first missing seq. The tables of an export
    /// are read one after the other: records a live session appended in between may be
    /// in a later table but not an earlier one, and a chain with a hole would not
    /// verify. Returns how many records were left out.
    pub fn cut_to_whole_chains(&mut self) -> Result<u64, BundleError> {
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let cols = |b: &RecordBatch| -> Result<(StringArray, UInt64Array), BundleError> {
            let chain = b
                .column_by_name("chain_id")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| build_err("chain_id is missing"))?;
            let seq = b
                .column_by_name("seq")
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
                .ok_or_else(|| build_err("seq is missing"))?;
            Ok((chain.clone(), seq.clone()))
        };
        for t in RECORD_TABLES {
            for b in self.tables.get(t).map(Vec::as_slice).unwrap_or_default() {
                let (chain, seq) = cols(b)?;
                for i in 0..b.num_rows() {
                    seqs.entry(chain.value(i).to_string())
                        .or_default()
                        .push(seq.value(i));
                }
            }
        }
        let ends: BTreeMap<String, u64> = seqs
            .into_iter()
            .map(|(c, mut s)| {
                s.sort_unstable();
                s.dedup();
                let whole = s
                    .iter()
                    .enumerate()
                    .take_while(|(i, q)| *i as u64 == **q)
                    .count();
                (c, whole as u64)
            })
            .collect();
        let mut dropped = 0u64;
        for t in RECORD_TABLES {
            let Some(batches) = self.tables.get_mut(t) else {
                continue;
            };
            for b in batches.iter_mut() {
                let (chain, seq) = cols(b)?;
                let keep: BooleanArray = (0..b.num_rows())
                    .map(|i| Some(seq.value(i) < ends[chain.value(i)]))
                    .collect();
                let kept = filter_record_batch(b, &keep).map_err(build_err)?;
                dropped += (b.num_rows() - kept.num_rows()) as u64;
                *b = kept;
            }
        }
        Ok(dropped)
    }
}

/// Who exports, and what they asked for.
#[derive(Debug, Clone)]
pub struct ExportMeta {
    pub exported_by: String,
    pub selection: Selection,
    pub created_unix_nanos: i64,
}

/// Builds, signs and writes a bundle of `slices` to `out`; returns its manifest and the
/// hex SHA-256 of `manifest.json` as written.
pub fn write_bundle(
    out: impl Write,
    slices: &Slices,
    key: &SigningKey,
    meta: &ExportMeta,
) -> Result<(Manifest, String), BundleError> {
    let records = slices.records()?;
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    for t in TABLES {
        let schema = tables::schema_of(t).expect("a known table");
        let batches = slices.tables.get(t).map(Vec::as_slice).unwrap_or_default();
        members.push((table_member(t), parquet_bytes(&schema, batches)?));
    }
    members.push((EVENTS.into(), events_jsonl(slices)?));
    members.push((HAR.into(), har::har(&records)?));
    members.push((PCAP.into(), pcap::pcapng(&records)));
    let mut manifest = manifest_of(slices, &records, key, meta);
    members.push((README.into(), readme(&manifest).into_bytes()));
    for (name, bytes) in &members {
        manifest.files.insert(
            name.clone(),
            FileEntry {
                sha256: sha256_hex(bytes),
                bytes: bytes.len() as u64,
            },
        );
    }
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(build_err)?;
    let sig = key.sign_bytes(&manifest_bytes);

    let mtime = (meta.created_unix_nanos.max(0) / 1_000_000_000) as u64;
    let mut enc = zstd::stream::write::Encoder::new(out, 3)?;
    // A checksum per frame: a corrupted archive is an error, not different bytes.
    enc.include_checksum(true)?;
    let mut tar = tar::Builder::new(enc);
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes)
    };
    add(MANIFEST, &manifest_bytes)?;
    add(SIGNATURE, &sig)?;
    // README first among the rest: `tar -tf` shows it near the top.
    members.sort_by_key(|(n, _)| (n != README, n.starts_with("tables/"), n.clone()));
    for (name, bytes) in &members {
        add(name, bytes)?;
    }
    let enc = tar.into_inner()?;
    enc.finish()?.flush()?;
    Ok((manifest, sha256_hex(&manifest_bytes)))
}

/// The events table, one JSON object per line (nulls left out; hashes in hex).
fn events_jsonl(slices: &Slices) -> Result<Vec<u8>, BundleError> {
    let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
    for b in slices
        .tables
        .get("events")
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        w.write(b).map_err(build_err)?;
    }
    w.finish().map_err(build_err)?;
    Ok(w.into_inner())
}

fn manifest_of(
    slices: &Slices,
    records: &[Record],
    key: &SigningKey,
    meta: &ExportMeta,
) -> Manifest {
    #[derive(Default)]
    struct Chain {
        opened: Option<(i64, String, String, String)>,
        records: u64,
        last: Option<(u64, [u8; 32])>,
        capture: BTreeSet<String>,
        redaction: BTreeSet<u32>,
    }
    let mut chains: BTreeMap<Uuid, Chain> = BTreeMap::new();
    for r in records {
        let c = chains.entry(r.chain_id).or_default();
        c.records += 1;
        c.last = Some((r.seq, r.record_hash));
        match &r.body {
            Body::SessionOpened(o) => {
                c.opened = Some((
                    r.ts_unix_nanos,
                    o.identity.clone(),
                    o.target.clone(),
                    o.replay_of.clone(),
                ))
            }
            Body::HttpExchange(x) => {
                c.capture.insert(x.capture.clone());
                c.redaction.insert(x.redaction_version);
            }
            _ => {}
        }
    }
    // Closed exactly when its `sessions` row is here (a session closed by the recorder
    // for a lost edge has no close record in its chain).
    let mut closed_rows: BTreeMap<String, i64> = BTreeMap::new();
    for b in slices
        .tables
        .get("sessions")
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let ids = b
            .column_by_name("session_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let at = b
            .column_by_name("closed_at")
            .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>());
        if let (Some(ids), Some(at)) = (ids, at) {
            for i in 0..b.num_rows() {
                closed_rows.insert(ids.value(i).to_string(), at.value(i));
            }
        }
    }
    let (mut sessions, mut other) = (Vec::new(), Vec::new());
    let (mut capture, mut redaction) = (BTreeSet::new(), BTreeSet::new());
    for (id, c) in chains {
        let (last_seq, last_hash) = c.last.expect("a chain has a record");
        capture.extend(c.capture.iter().cloned());
        redaction.extend(c.redaction.iter().copied());
        match c.opened {
            Some((at, identity, target, replay_of)) => sessions.push(ManifestSession {
                session_id: id.hyphenated().to_string(),
                identity,
                target,
                opened_at: rfc3339(at),
                closed_at: closed_rows
                    .get(&id.hyphenated().to_string())
                    .map(|t| rfc3339(*t)),
                replay_of,
                records: c.records,
                last_seq,
                last_record_hash: hex::encode(last_hash),
                capture_levels: c.capture.into_iter().collect(),
                redaction_versions: c.redaction.into_iter().collect(),
            }),
            None => other.push(ManifestChain {
                chain_id: id.hyphenated().to_string(),
                records: c.records,
                last_seq,
                last_record_hash: hex::encode(last_hash),
            }),
        }
    }
    let first = records.iter().map(|r| r.ts_unix_nanos).min();
    let last = records.iter().map(|r| r.ts_unix_nanos).max();
    Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        cloudtap_version: env!("CARGO_PKG_VERSION").into(),
        tables_version: TABLES_VERSION,
        created_at: rfc3339(meta.created_unix_nanos),
        exported_by: meta.exported_by.clone(),
        export_key: key.public_hex(),
        selection: meta.selection.clone(),
        first_record_at: first.map(rfc3339),
        last_record_at: last.map(rfc3339),
        sessions,
        other_chains: other,
        record_counts: TABLES
            .iter()
            .map(|t| {
                let rows = slices
                    .tables
                    .get(*t)
                    .map_or(0, |bs| bs.iter().map(|b| b.num_rows() as u64).sum());
                (t.to_string(), rows)
            })
            .collect(),
        capture_levels: capture.into_iter().collect(),
        redaction_versions: redaction.into_iter().collect(),
        files: BTreeMap::new(),
    }
}

fn readme(m: &Manifest) -> String {
    let mut s = format!(
        "cloudtap incident bundle (format {FORMAT_VERSION}, cloudtap {})\n\
         Exported {} by {}; {} session(s), records from {} to {}.\n\n",
        m.cloudtap_version,
        m.created_at,
        m.exported_by,
        m.sessions.len(),
        m.first_record_at.as_deref().unwrap_or("-"),
        m.last_record_at.as_deref().unwrap_or("-"),
    );
    for x in &m.sessions {
        s += &format!(
            "  {}  {} -> {}  opened {}{}\n",
            x.session_id,
            x.identity,
            x.target,
            x.opened_at,
            x.closed_at
                .as_ref()
                .map_or(" (open at export)".to_string(), |c| format!(", closed {c}"))
        );
    }
    s += concat!(
        "\nMembers\n",
        "  manifest.json     what is inside, with the SHA-256 of every other member\n",
        "  manifest.sig      Ed25519 signature over manifest.json by the server's export key\n",
        "  tables/*.parquet  the stored rows of every table (DuckDB: SELECT * FROM 'tables/events.parquet')\n",
        "  events.jsonl      the events table, one JSON object per line\n",
        "  exchanges.har     HTTP and gRPC exchanges as HAR 1.2 (browser devtools: Network, import HAR)\n",
        "  capture.pcapng    TCP packets synthesized from the stored stream bytes (Wireshark: Follow\n",
        "                    TCP Stream); a stream whose payload was not stored has its sizes in a\n",
        "                    packet comment\n",
        "\n",
        "Everything here is what the capture stored: redacted at capture, nothing altered since.\n",
        "Check it:   cloudtapctl bundle verify FILE [--trust EXPORT_PUBLIC_KEY]\n",
        "Query it:   cloudtapctl query --from-bundle FILE \"SELECT ...\"\n",
        "Replay it:  cloudtapctl replay SESSION --from-bundle FILE [--direct HOST:PORT]\n",
        "Load it:    cloudtapctl import FILE\n",
    );
    s
}

/// A reader that fails once more than `left` bytes came through.
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!(
                "it holds more than {} GiB uncompressed, more than this build reads",
                MAX_BUNDLE_BYTES >> 30
            ))
        })?;
        Ok(n)
    }
}

/// A bundle read back: its members by name.
#[derive(Debug)]
pub struct Bundle {
    pub members: BTreeMap<String, Vec<u8>>,
}

/// How one of the three checks went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    pub ok: bool,
    /// What passed, in a line.
    pub summary: String,
    /// What failed, one line each, naming the member or chain.
    pub problems: Vec<String>,
}

impl Check {
    fn of(summary: String, problems: Vec<String>) -> Self {
        Self {
            ok: problems.is_empty(),
            summary,
            problems,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub files: Check,
    pub chains: Check,
    pub signature: Check,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.files.ok && self.chains.ok && self.signature.ok
    }
}

/// Most a bundle may hold, uncompressed, for this build to read it (members are read
/// into memory): a large capture fits, a compressed bomb does not exhaust memory.
pub const MAX_BUNDLE_BYTES: u64 = 4 << 30;

impl Bundle {
    /// Reads a `.tar.zst` bundle. A truncated or corrupted archive, or a member that is
    /// not a plain file with a relative name, is an error that says so.
    pub fn read(mut src: impl Read, name: &str) -> Result<Bundle, BundleError> {
        let corrupt = |what: String| {
            BundleError::Corrupt(format!(
                "{name} is not a complete cloudtap bundle ({what}); it may be truncated or corrupted: copy or export it again"
            ))
        };
        let mut magic = [0u8; 4];
        src.read_exact(&mut magic)
            .map_err(|e| corrupt(format!("cannot read its first bytes: {e}")))?;
        if magic != [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(corrupt("not zstd-compressed".into()));
        }
        let dec = zstd::stream::read::Decoder::new(std::io::Cursor::new(magic).chain(src))
            .map_err(|e| corrupt(e.to_string()))?;
        // Capped below tar, whose own headers (long names, PAX) are read whole too.
        let mut tar = tar::Archive::new(Capped {
            inner: dec,
            left: MAX_BUNDLE_BYTES + (1 << 20),
        });
        let mut members = BTreeMap::new();
        let mut total = 0u64;
        let entries = tar.entries().map_err(|e| corrupt(e.to_string()))?;
        for e in entries {
            let mut e = e.map_err(|e| corrupt(e.to_string()))?;
            let path = e
                .path()
                .map_err(|e| corrupt(e.to_string()))?
                .to_string_lossy()
                .into_owned();
            if e.header().entry_type() != tar::EntryType::Regular {
                return Err(corrupt(format!("{path} is not a plain file")));
            }
            if path.starts_with('/') || path.split('/').any(|p| p == ".." || p.is_empty()) {
                return Err(corrupt(format!("member name {path:?} is not allowed")));
            }
            let size = e.size();
            total = total.saturating_add(size);
            if total > MAX_BUNDLE_BYTES {
                return Err(BundleError::Corrupt(format!(
                    "{name} holds more than {} GiB uncompressed, more than this build reads; ask for a bundle of fewer sessions",
                    MAX_BUNDLE_BYTES >> 30
                )));
            }
            let mut bytes = Vec::with_capacity(size.min(1 << 26) as usize);
            e.read_to_end(&mut bytes)
                .map_err(|err| corrupt(format!("{path}: {err}")))?;
            if bytes.len() as u64 != size {
                return Err(corrupt(format!("{path} is cut short")));
            }
            if members.insert(path.clone(), bytes).is_some() {
                return Err(corrupt(format!("{path} appears twice")));
            }
        }
        // The tar reader stops at the end-of-archive blocks or at EOF; drain the rest
        // so the zstd frame is checked to its end (a cut frame is an error here).
        let mut rest = tar.into_inner();
        std::io::copy(&mut rest, &mut std::io::sink())
            .map_err(|e| corrupt(format!("the compressed stream ends early: {e}")))?;
        if !members.contains_key(MANIFEST) {
            return Err(corrupt(format!("it has no {MANIFEST}")));
        }
        Ok(Bundle { members })
    }

    pub fn open(path: &std::path::Path) -> Result<Bundle, BundleError> {
        let f = std::fs::File::open(path).map_err(|e| {
            BundleError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot open {}: {e}", path.display()),
            ))
        })?;
        Bundle::read(std::io::BufReader::new(f), &path.display().to_string())
    }

    /// The manifest, when it parses and is of a format this build reads.
    pub fn manifest(&self) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(&self.members[MANIFEST])
            .map_err(|e| format!("{MANIFEST} is not a valid manifest: {e}"))?;
        if m.format != FORMAT {
            return Err(format!(
                "{MANIFEST} is of format {:?}, not {FORMAT}",
                m.format
            ));
        }
        if m.format_version > FORMAT_VERSION {
            return Err(format!(
                "bundle format {} is newer than this cloudtapctl reads ({FORMAT_VERSION}); upgrade cloudtapctl",
                m.format_version
            ));
        }
        Ok(m)
    }

    /// A table's batches.
    pub fn table(&self, table: &str) -> Result<Vec<RecordBatch>, String> {
        let name = table_member(table);
        let bytes = self
            .members
            .get(&name)
            .ok_or_else(|| format!("the bundle has no {name}"))?;
        read_parquet(&name, bytes)
    }

    /// Every record of the bundle, by chain and seq.
    pub fn records(&self) -> Result<Vec<Record>, String> {
        records_of(|t| self.table(t))
    }

    /// Checks the three things separately: every member's hash against the manifest,
    /// every chain from seq 0 to the end the manifest names, and the signature over
    /// the manifest against `trusted` keys.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Verification {
        let manifest = self.manifest();
        let files = match &manifest {
            Err(e) => Check::of(String::new(), vec![e.clone()]),
            Ok(m) => self.check_files(m),
        };
        let chains = match &manifest {
            Err(_) => Check::of(
                String::new(),
                vec![format!("not checked: {MANIFEST} does not parse")],
            ),
            Ok(m) => self.check_chains(m),
        };
        let signature = self.check_signature(trusted);
        Verification {
            files,
            chains,
            signature,
        }
    }

    fn check_files(&self, m: &Manifest) -> Check {
        let mut problems = Vec::new();
        for (name, want) in &m.files {
            match self.members.get(name) {
                None => problems.push(format!("{name}: listed in {MANIFEST} but missing")),
                Some(b) if sha256_hex(b) != want.sha256 || b.len() as u64 != want.bytes => problems
                    .push(format!(
                        "{name}: SHA-256 does not match {MANIFEST} (the file was changed)"
                    )),
                Some(_) => {}
            }
        }
        for name in self.members.keys() {
            if name != MANIFEST && name != SIGNATURE && !m.files.contains_key(name) {
                problems.push(format!("{name}: in the archive but not in {MANIFEST}"));
            }
        }
        Check::of(
            format!("{} files match {MANIFEST}", m.files.len()),
            problems,
        )
    }

    fn check_chains(&self, m: &Manifest) -> Check {
        let mut problems = Vec::new();
        let mut chains: BTreeMap<Uuid, Vec<Record>> = BTreeMap::new();
        // Each table on its own, so a broken one is named and the others still checked.
        for t in RECORD_TABLES {
            match records_of(|name| {
                if name == t {
                    self.table(t)
                } else {
                    Ok(Vec::new())
                }
            }) {
                Err(e) => problems.push(e),
                Ok(rs) => {
                    for r in rs {
                        chains.entry(r.chain_id).or_default().push(r);
                    }
                }
            }
        }
        let mut expected: BTreeMap<Uuid, (String, u64, u64, String)> = BTreeMap::new();
        let ends = m
            .sessions
            .iter()
            .map(|s| {
                (
                    &s.session_id,
                    "session",
                    s.records,
                    s.last_seq,
                    &s.last_record_hash,
                )
            })
            .chain(m.other_chains.iter().map(|c| {
                (
                    &c.chain_id,
                    "chain",
                    c.records,
                    c.last_seq,
                    &c.last_record_hash,
                )
            }));
        for (id, what, records, last_seq, hash) in ends {
            match Uuid::parse_str(id) {
                Ok(u) => {
                    expected.insert(u, (what.to_string(), records, last_seq, hash.clone()));
                }
                Err(_) => problems.push(format!("{MANIFEST} names chain {id:?}, not a UUID")),
            }
        }
        let mut verified = 0u64;
        for (id, recs) in chains.iter_mut() {
            recs.sort_by_key(|r| r.seq);
            let Some((what, records, last_seq, hash)) = expected.remove(id) else {
                problems.push(format!("chain {id} is not listed in {MANIFEST}"));
                continue;
            };
            if let Err(e) = verify_chain(None, recs.iter()) {
                problems.push(format!("{what} {id}: {e}"));
                continue;
            }
            let last = recs.last().expect("a listed chain has records");
            if recs.len() as u64 != records
                || last.seq != last_seq
                || hex::encode(last.record_hash) != hash
            {
                problems.push(format!(
                    "{what} {id}: {} records ending at seq {}, but {MANIFEST} says {records} ending at seq {last_seq} (records were removed or added)",
                    recs.len(),
                    last.seq
                ));
                continue;
            }
            verified += recs.len() as u64;
        }
        for (id, (what, ..)) in expected {
            problems.push(format!(
                "{what} {id}: listed in {MANIFEST} but has no records"
            ));
        }
        Check::of(
            format!(
                "{} chains, {verified} records verify from seq 0",
                chains.len()
            ),
            problems,
        )
    }

    fn check_signature(&self, trusted: &[VerifyingKey]) -> Check {
        let Some(sig) = self.members.get(SIGNATURE) else {
            return Check::of(
                String::new(),
                vec![format!("the bundle has no {SIGNATURE}")],
            );
        };
        if trusted.is_empty() {
            return Check::of(
                String::new(),
                vec!["no export key is trusted: pass --trust KEY (the server's export public key), or run `cloudtapd all` once so the CLI's config trusts the local one".into()],
            );
        }
        let manifest = &self.members[MANIFEST];
        match trusted.iter().find(|k| k.verify_bytes(manifest, sig)) {
            Some(k) => Check::of(
                format!("signed by trusted export key {}", k.to_hex()),
                vec![],
            ),
            None => {
                let claimed = serde_json::from_slice::<serde_json::Value>(manifest)
                    .ok()
                    .and_then(|v| v["export_key"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unknown".into());
                Check::of(
                    String::new(),
                    vec![format!(
                        "{SIGNATURE}: not a signature over {MANIFEST} by any trusted export key (the manifest names key {claimed})"
                    )],
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::{ChainWriter, Direction, Frame, StreamOpened};

    fn slices(records: &[Record]) -> Slices {
        let mut s = Slices::default();
        for t in RECORD_TABLES {
            let rows: Vec<(&Record, bool)> = records
                .iter()
                .filter(|r| tables::table_of(r) == t)
                .map(|r| (r, false))
                .collect();
            let b = tables::records_batch(t, rows.into_iter()).unwrap();
            s.tables.insert(t.to_string(), vec![b]);
        }
        s
    }

    #[test]
    fn chains_are_cut_at_their_first_missing_record() {
        let mut w = ChainWriter::new(Uuid::now_v7());
        let frame = |n: u64| {
            Body::Frame(Frame {
                stream_id: 1,
                direction: Direction::Up,
                offset: n,
                length: 1,
                payload: Some(vec![1]),
            })
        };
        let opened = Body::StreamOpened(StreamOpened {
            stream_id: 1,
            ..Default::default()
        });
        let all = [
            w.seal(1, opened.clone()),
            w.seal(2, frame(0)),
            w.seal(3, opened),
            w.seal(4, frame(1)),
        ];
        // The events table was read before seq 2 was appended; frames after seq 3 was.
        let seen = [all[0].clone(), all[1].clone(), all[3].clone()];
        let mut s = slices(&seen);
        assert_eq!(s.cut_to_whole_chains().unwrap(), 1);
        let kept = s.records().unwrap();
        assert_eq!(kept.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert!(verify_chain(None, kept.iter()).is_ok());
        // Whole chains are left as they are.
        let mut s = slices(&all);
        assert_eq!(s.cut_to_whole_chains().unwrap(), 0);
        assert_eq!(s.records().unwrap().len(), 4);
    }
}
