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

/// `cloudtapctl`'s own configuration: the export keys whose bundles it trusts.
pub fn cli_config(data_dir: &Path) -> PathBuf {
    data_dir.join("cli").join("config.toml")
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    #[serde(default)]
    pub bundle: BundleConfig,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// Hex Ed25519 public keys; `bundle verify` checks signatures against these.
    #[serde(default)]
    pub trusted_export_keys: Vec<String>,
}

/// The CLI's configuration; a missing file is the empty one.
pub fn read_cli_config(data_dir: &Path) -> anyhow::Result<CliConfig> {
    let path = cli_config(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not valid: {e}; fix or remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Adds `key` to the CLI's trusted export keys (nothing when it is there already).
pub fn trust_export_key(data_dir: &Path, key: &str) -> anyhow::Result<()> {
    let mut cfg = read_cli_config(data_dir)?;
    if cfg.bundle.trusted_export_keys.iter().any(|k| k == key) {
        return Ok(());
    }
    cfg.bundle.trusted_export_keys.push(key.to_string());
    let path = cli_config(data_dir);
    std::fs::create_dir_all(path.parent().expect("config has a parent"))?;
    let text = format!(
        "# cloudtapctl's configuration. `cloudtapd all` adds its export key below, so\n\
         # `cloudtapctl bundle verify` trusts the bundles it signs.\n{}",
        toml::to_string(&cfg)?
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}
