//! The data dir shared by `cloudtapd` and `cloudtapctl`, and what lives in it.

use std::path::{Path, PathBuf};

use cloudtap_edge::Endpoints;

/// `--data-dir` / `CLOUDTAP_DATA_DIR`, else `$XDG_DATA_HOME/cloudtap`, else
/// `~/.local/share/cloudtap`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("cloudtap");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/cloudtap")
}

pub fn endpoints_file(data_dir: &Path) -> PathBuf {
    data_dir.join("endpoints.json")
}

/// Writes `endpoints.json` atomically (write + rename).
pub fn write_endpoints(data_dir: &Path, e: &Endpoints) -> std::io::Result<()> {
    let path = endpoints_file(data_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(e).expect("endpoints serialize"),
    )?;
    std::fs::rename(tmp, path)
}

pub fn read_endpoints(data_dir: &Path) -> Option<Endpoints> {
    let bytes = std::fs::read(endpoints_file(data_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Where `cloudtapctl` caches its user token (mode 0600).
pub fn token_cache(data_dir: &Path) -> PathBuf {
    data_dir.join("cli").join("token.json")
}
