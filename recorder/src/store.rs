//! Object stores the recorder writes Parquet to: a local directory (the embedded
//! default) or S3 (any S3-compatible server).
//!
//! Keys are `/`-separated paths relative to the store's root. The one operation that
//! makes exactly-once work is [`ObjectStore::put_if_absent`]: it creates an object
//! only if no object has that key, atomically (locally a hard link, which fails when
//! the name exists; on S3 `If-None-Match: *`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;

/// Objects larger than this go up in parts (S3 multipart upload).
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Size of each part of a multipart upload (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store {store}: {op} {key:?} failed: {detail}")]
    Failed {
        store: String,
        op: &'static str,
        key: String,
        detail: String,
    },
    #[error("archive URL {url:?} is not supported: {reason}")]
    BadUrl { url: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

pub trait ObjectStore: Send + Sync + 'static {
    /// Writes `data` at `key`, replacing any object there. Readers never see a partial object.
    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Creates `key` only if it does not exist: `Ok(true)` if this call created it,
    /// `Ok(false)` if an object was already there (left untouched).
    fn put_if_absent(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// The object at `key`, or `None`.
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>>;
    /// Every object whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<ObjectMeta>, StoreError>>;
    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Where this store is, for logs (no credentials).
    fn describe(&self) -> String;
}

/// S3 settings beyond the URL. Empty fields fall back to the standard AWS environment
/// variables and profiles (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL`, `AWS_PROFILE`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// Endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint` (most
    /// S3-compatible servers need this). Default: true when an endpoint is set.
    #[serde(default)]
    pub path_style: Option<bool>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

/// Opens the store named by `url`: `file:///dir` or a plain path, or `s3://bucket[/prefix]`.
pub async fn open_store(
    url: &str,
    s3: &S3Settings,
) -> Result<std::sync::Arc<dyn ObjectStore>, StoreError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::BadUrl {
                url: url.into(),
                reason: "expected s3://bucket[/prefix]".into(),
            });
        }
        return Ok(std::sync::Arc::new(
            S3Store::new(bucket, prefix.trim_end_matches('/'), s3).await,
        ));
    }
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if url.contains("://") => {
            return Err(StoreError::BadUrl {
                url: url.into(),
                reason: "expected file:///dir, a directory path, or s3://bucket[/prefix]".into(),
            });
        }
        None => url,
    };
    Ok(std::sync::Arc::new(LocalStore::new(path)))
}

/// A directory on local disk. Writes go to `<root>/.tmp` first and are renamed (or, for
/// `put_if_absent`, hard-linked) into place, then fsynced with their directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || key.starts_with(".tmp")
        {
            return Err(self.fail("resolve", key, "not a valid object key".into()));
        }
        Ok(self.root.join(key))
    }

    fn fail(&self, op: &'static str, key: &str, detail: String) -> StoreError {
        StoreError::Failed {
            store: self.describe(),
            op,
            key: key.into(),
            detail,
        }
    }

    /// Writes `data` to a new temporary file, fsynced; returns its path.
    fn write_tmp(&self, data: &[u8]) -> std::io::Result<PathBuf> {
        use std::io::Write;
        let dir = self.root.join(".tmp");
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(uuid::Uuid::now_v7().to_string());
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        Ok(tmp)
    }

    fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        f: impl FnOnce(LocalStore) -> std::io::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let me = self.clone();
        let key = key.to_owned();
        async move {
            let fail_me = me.clone();
            tokio::task::spawn_blocking(move || f(me))
                .await
                .expect("store task panicked")
                .map_err(|e| fail_me.fail(op, &key, e.to_string()))
        }
        .boxed()
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl ObjectStore for LocalStore {
    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
        let dest = match self.path_of(key) {
            Ok(p) => p,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        self.run("put", key, move |me| {
            let parent = dest.parent().expect("keys have a parent");
            std::fs::create_dir_all(parent)?;
            let tmp = me.write_tmp(&data)?;
            std::fs::rename(&tmp, &dest)?;
            sync_dir(parent)
        })
    }

    fn put_if_absent(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<bool, StoreError>> {
        let dest = match self.path_of(key) {
            Ok(p) => p,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        self.run("create", key, move |me| {
            let parent = dest.parent().expect("keys have a parent");
            std::fs::create_dir_all(parent)?;
            let tmp = me.write_tmp(&data)?;
            // link(2) fails if the name exists: the atomic "create only if absent".
            let created = match std::fs::hard_link(&tmp, &dest) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::remove_file(&tmp)?;
            if created {
                sync_dir(parent)?;
            }
            Ok(created)
        })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
        let path = match self.path_of(key) {
            Ok(p) => p,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        self.run("get", key, move |_| match std::fs::read(&path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<ObjectMeta>, StoreError>> {
        let prefix = prefix.to_owned();
        self.run("list", &prefix.clone(), move |me| {
            // Walk only the directory the prefix names (up to its last '/').
            let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
            let start = me.root.join(dir_part);
            let mut out = Vec::new();
            let mut stack = vec![start];
            while let Some(dir) = stack.pop() {
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in rd {
                    let entry = entry?;
                    let path = entry.path();
                    let rel = path
                        .strip_prefix(&me.root)
                        .expect("walk stays under the root")
                        .to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/");
                    if rel.starts_with(".tmp") {
                        continue;
                    }
                    let meta = entry.metadata()?;
                    if meta.is_dir() {
                        if format!("{rel}/").starts_with(&prefix) || prefix.starts_with(&rel) {
                            stack.push(path);
                        }
                    } else if rel.starts_with(&prefix) {
                        out.push(ObjectMeta {
                            key: rel,
                            size: meta.len(),
                            modified: meta.modified().ok(),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
    }

    fn delete(&self, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let path = match self.path_of(key) {
            Ok(p) => p,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        self.run("delete", key, move |_| match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// A bucket (and key prefix) on S3 or an S3-compatible server, through aws-sdk-s3.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
}

impl S3Store {
    pub async fn new(bucket: &str, prefix: &str, s: &S3Settings) -> Self {
        use aws_config::BehaviorVersion;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &s.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "cloudtap-config",
            ));
        }
        if let Some(e) = &s.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        let shared = loader.load().await;
        let endpoint = s.endpoint.clone().or_else(|| {
            std::env::var("AWS_ENDPOINT_URL_S3")
                .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                .ok()
        });
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            // Plain checksums only where S3 requires them: S3-compatible servers vary.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if shared.region().is_none() {
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        b = b.force_path_style(s.path_style.unwrap_or(endpoint.is_some()));
        Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint,
        }
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.into()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn fail<E: std::fmt::Debug + std::error::Error + 'static>(
        &self,
        op: &'static str,
        key: &str,
        e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError {
        use aws_sdk_s3::error::DisplayErrorContext;
        StoreError::Failed {
            store: self.describe(),
            op,
            key: key.into(),
            detail: format!(
                "{}; check the endpoint, the bucket and the credentials",
                DisplayErrorContext(e)
            ),
        }
    }

    async fn put_multipart(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        use aws_sdk_s3::primitives::ByteStream;
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let full = self.full(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.fail("create multipart upload", key, &e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result: Result<Vec<CompletedPart>, StoreError> = async {
            let mut parts = Vec::new();
            for (i, chunk) in data.chunks(PART_SIZE).enumerate() {
                let n = i as i32 + 1;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(ByteStream::from(data.slice_ref(chunk)))
                    .send()
                    .await
                    .map_err(|e| self.fail("upload part", key, &e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .build(),
                );
            }
            Ok(parts)
        }
        .await;
        let parts = match result {
            Ok(p) => p,
            Err(e) => {
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(e);
            }
        };
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.fail("complete multipart upload", key, &e))?;
        Ok(())
    }
}

impl ObjectStore for S3Store {
    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
        let key = key.to_owned();
        async move {
            if data.len() > MULTIPART_THRESHOLD {
                return self.put_multipart(&key, data).await;
            }
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(&key))
                .body(data.into())
                .send()
                .await
                .map_err(|e| self.fail("put", &key, &e))?;
            Ok(())
        }
        .boxed()
    }

    fn put_if_absent(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<bool, StoreError>> {
        let key = key.to_owned();
        async move {
            match self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(&key))
                .if_none_match("*")
                .body(data.into())
                .send()
                .await
            {
                Ok(_) => Ok(true),
                // 412: the object exists. 409: a concurrent conditional write won.
                Err(e)
                    if e.raw_response()
                        .is_some_and(|r| matches!(r.status().as_u16(), 412 | 409)) =>
                {
                    Ok(false)
                }
                Err(e) => Err(self.fail("create", &key, &e)),
            }
        }
        .boxed()
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
        let key = key.to_owned();
        async move {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(&key))
                .send()
                .await
            {
                Ok(o) => o,
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                    return Ok(None);
                }
                Err(e) => return Err(self.fail("get", &key, &e)),
            };
            let body = out.body.collect().await.map_err(|e| StoreError::Failed {
                store: self.describe(),
                op: "get",
                key: key.clone(),
                detail: e.to_string(),
            })?;
            Ok(Some(body.into_bytes()))
        }
        .boxed()
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<ObjectMeta>, StoreError>> {
        let prefix = prefix.to_owned();
        async move {
            let full_prefix = self.full(&prefix);
            let strip = if self.prefix.is_empty() {
                0
            } else {
                self.prefix.len() + 1
            };
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.fail("list", &prefix, &e))?;
                for o in page.contents() {
                    let Some(k) = o.key() else { continue };
                    out.push(ObjectMeta {
                        key: k[strip.min(k.len())..].to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o
                            .last_modified()
                            .and_then(|t| SystemTime::try_from(*t).ok()),
                    });
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.into()),
                    _ => break,
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        }
        .boxed()
    }

    fn delete(&self, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let key = key.to_owned();
        async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.full(&key))
                .send()
                .await
                .map_err(|e| self.fail("delete", &key, &e))?;
            Ok(())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        let at = self
            .endpoint
            .as_deref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default();
        if self.prefix.is_empty() {
            format!("s3://{}{at}", self.bucket)
        } else {
            format!("s3://{}/{}{at}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object-store suite every backend runs.
    async fn conformance(store: &dyn ObjectStore) {
        let k = "t/date=2026-01-01/hour=00/a.parquet";
        assert_eq!(store.get(k).await.unwrap(), None);
        store.put(k, Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(store.get(k).await.unwrap().unwrap(), "one");
        store.put(k, Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(store.get(k).await.unwrap().unwrap(), "two");

        // Conditional create: only the first succeeds, and it is not overwritten.
        let m = "_ranges/00000/00000000000000000000.json";
        assert!(
            store
                .put_if_absent(m, Bytes::from_static(b"first"))
                .await
                .unwrap()
        );
        assert!(
            !store
                .put_if_absent(m, Bytes::from_static(b"second"))
                .await
                .unwrap()
        );
        assert_eq!(store.get(m).await.unwrap().unwrap(), "first");

        // Big objects go up in parts and come back whole.
        let big: Vec<u8> = (0..MULTIPART_THRESHOLD + PART_SIZE + 123)
            .map(|i| (i % 251) as u8)
            .collect();
        store
            .put("big/obj", Bytes::from(big.clone()))
            .await
            .unwrap();
        assert_eq!(store.get("big/obj").await.unwrap().unwrap(), big);

        let keys: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(
            keys,
            vec!["_ranges/00000/00000000000000000000.json", "big/obj", k]
        );
        let under: Vec<String> = store
            .list("_ranges/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(under, vec![m]);
        assert_eq!(store.list("t/date=2026-01-01/").await.unwrap().len(), 1);
        assert!(store.list("nothing/").await.unwrap().is_empty());

        store.delete(k).await.unwrap();
        store.delete(k).await.unwrap(); // missing: fine
        assert_eq!(store.get(k).await.unwrap(), None);
    }

    #[tokio::test]
    async fn local_directory_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&LocalStore::new(dir.path())).await;
        // Nothing is left in the temporary area.
        assert_eq!(
            std::fs::read_dir(dir.path().join(".tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn concurrent_creates_have_exactly_one_winner_locally() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalStore::new(dir.path()));
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.put_if_absent("m/x", Bytes::from(vec![i])).await.unwrap()
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += t.await.unwrap() as u32;
        }
        assert_eq!(wins, 1);
    }

    #[test]
    fn keys_cannot_escape_the_root() {
        let s = LocalStore::new("/tmp/x");
        for bad in ["../etc/passwd", "/abs", "a//b", "a/./b", ".tmp/x", ""] {
            assert!(s.path_of(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_server_passes_the_suite() {
        let Some(settings) = crate::testenv::s3("s3 object-store suite") else {
            return;
        };
        let bucket = std::env::var("CLOUDTAP_TEST_S3_BUCKET").unwrap_or("cloudtap".into());
        let prefix = format!("store-suite-{}", uuid::Uuid::now_v7().simple());
        let store = S3Store::new(&bucket, &prefix, &settings).await;
        conformance(&store).await;
    }
}
