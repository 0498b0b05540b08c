//! For tests: endpoints of the real services `scripts/services.sh` starts.
//!
//! Tests read endpoints only from the environment the script prints. A missing
//! variable fails the test under `CI=true`; elsewhere it says loudly that the test
//! was skipped — never a silent pass.

/// The value of `var`, or `None` (after saying why) when it is unset outside CI.
///
/// # Panics
/// When `var` is unset and `CI=true`.
pub fn service(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            let why = format!(
                "{test}: {var} is not set; run the tests through scripts/test.sh (it starts the services), \
                 or `eval \"$(scripts/services.sh start)\"` first"
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}");
            }
            eprintln!("SKIPPED (service missing) — {why}");
            None
        }
    }
}

/// S3 settings of the test server, from `CLOUDTAP_TEST_S3_*`.
pub fn s3(test: &str) -> Option<crate::store::S3Settings> {
    let endpoint = service("CLOUDTAP_TEST_S3_ENDPOINT", test)?;
    Some(crate::store::S3Settings {
        endpoint: Some(endpoint),
        region: std::env::var("CLOUDTAP_TEST_S3_REGION").ok(),
        path_style: Some(true),
        access_key_id: std::env::var("CLOUDTAP_TEST_S3_ACCESS_KEY").ok(),
        secret_access_key: std::env::var("CLOUDTAP_TEST_S3_SECRET_KEY").ok(),
    })
}

/// A log URL for a fresh topic on the test broker (tansu 0.6: one record per batch, see
/// the Kafka backend's docs).
pub fn kafka_url(brokers: &str, topic: &str, partitions: u32) -> String {
    format!(
        "kafka://{brokers}/{topic}?partitions={partitions}&single_record_batches=true&fetch.wait.max.ms=5"
    )
}
