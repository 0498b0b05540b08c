//! `docs/api/openapi.yaml` documents the query role's HTTP routes (marked
//! `x-cloudtap-role: query`), and only those the service serves.

use std::collections::BTreeSet;

#[test]
fn the_query_routes_are_documented_and_nothing_else() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/api/openapi.yaml"
    ))
    .unwrap();
    let spec: serde_json::Value = serde_norway::from_str(&text).unwrap();
    let mut documented = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        if ops.get("x-cloudtap-role").and_then(|r| r.as_str()) != Some("query") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            if !method.starts_with("x-") {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = cloudtap_query::service::HTTP_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
}
