//! HTTP/2 (gRPC) streams are replayed from their bytes and compared through what the
//! edge mirrored: the source session's exchanges on a stream against the replay
//! session's exchanges on the stream that replayed it (found by its label, which the
//! edge records as the stream's `client_addr`).

use std::collections::{BTreeMap, HashMap};

use cloudtap_schemas::{Body, ExchangePhase, HttpExchange, Record, ReplayDiff};

use crate::diff::{self, DiffOptions};
use crate::engine::STREAM_LABEL;
use crate::kind;
use crate::plan::{Plan, Step};

/// Exchange records the replay should produce for its HTTP/2 streams (heads and ends,
/// not messages): how many to wait for; 0 when there are none to compare.
pub fn expected(plan: &Plan) -> usize {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::Stream(st) => Some(
                st.mirrored
                    .iter()
                    .filter(|x| x.phase != ExchangePhase::Message)
                    .count(),
            ),
            _ => None,
        })
        .sum()
}

/// (exchange, message, phase rank): how a stream's records are matched and ordered.
fn key(x: &HttpExchange) -> (u64, u64, u8) {
    let rank = match x.phase {
        ExchangePhase::Complete | ExchangePhase::Start => 0,
        ExchangePhase::Message => 1,
        ExchangePhase::End => 2,
    };
    (x.exchange_index, x.message_index, rank)
}

/// The replay session's exchanges per source stream they replayed.
fn replayed(records: &[Record]) -> HashMap<u64, BTreeMap<(u64, u64, u8), HttpExchange>> {
    let mut label_of: HashMap<u64, u64> = HashMap::new();
    for r in records {
        if let Body::StreamOpened(o) = &r.body
            && let Some(src) = o
                .client_addr
                .strip_prefix(STREAM_LABEL)
                .and_then(|n| n.parse().ok())
        {
            label_of.insert(o.stream_id, src);
        }
    }
    let mut out: HashMap<u64, BTreeMap<_, _>> = HashMap::new();
    for r in records {
        if let Body::HttpExchange(x) = &r.body
            && let Some(src) = label_of.get(&x.stream_id)
        {
            out.entry(*src).or_default().insert(key(x), (**x).clone());
        }
    }
    out
}

/// How many head/end exchange records of the replayed streams `records` hold.
pub fn seen(records: &[Record]) -> usize {
    replayed(records)
        .values()
        .flat_map(|m| m.values())
        .filter(|x| x.phase != ExchangePhase::Message)
        .count()
}

/// Per replayed HTTP/2 stream, its findings.
pub fn compare(plan: &Plan, replay_records: &[Record], opts: &DiffOptions) -> Vec<Vec<ReplayDiff>> {
    let got = replayed(replay_records);
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    for step in &plan.steps {
        let Step::Stream(st) = step else { continue };
        if st.mirrored.is_empty() {
            continue;
        }
        let theirs = got.get(&st.stream_id).unwrap_or(&empty);
        let mut found = Vec::new();
        for x in &st.mirrored {
            match theirs.get(&key(x)) {
                Some(g) => found.extend(diff::mirrored(x, g, opts)),
                None => found.push(diff::finding(
                    x,
                    kind::FAILED,
                    &match x.phase {
                        ExchangePhase::Message => format!("message {}", x.message_index),
                        _ => "exchange".into(),
                    },
                    String::new(),
                    String::new(),
                    "the edge mirrored no such answer from the replay",
                )),
            }
        }
        out.push(found);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebuild::OpaqueStream;
    use cloudtap_schemas::{ChainWriter, StreamOpened};

    fn call(stream: u64, index: u64, grpc_status: &str) -> HttpExchange {
        HttpExchange {
            stream_id: stream,
            exchange_index: index,
            protocol: "HTTP/2".into(),
            method: "POST".into(),
            path: format!("/shop.Items/M{index}"),
            status: 200,
            grpc_service: "shop.Items".into(),
            grpc_status: grpc_status.into(),
            capture: "full".into(),
            ..Default::default()
        }
    }

    #[test]
    fn replayed_exchanges_are_found_by_their_stream_label_and_compared() {
        let plan = Plan {
            steps: vec![Step::Stream(OpaqueStream {
                stream_id: 1,
                up: vec![(0, b"x".to_vec())],
                mirrored: vec![call(1, 0, "0"), call(1, 1, "0")],
                ..Default::default()
            })],
            ..Default::default()
        };
        assert_eq!(expected(&plan), 2);
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        let records = vec![
            w.seal(
                1,
                Body::StreamOpened(StreamOpened {
                    stream_id: 9,
                    client_addr: crate::engine::stream_label(1),
                    ..Default::default()
                }),
            ),
            w.seal(2, Body::HttpExchange(Box::new(call(9, 0, "5")))),
            // Another stream's exchange is no answer for stream 1.
            w.seal(3, Body::HttpExchange(Box::new(call(4, 1, "0")))),
        ];
        assert_eq!(seen(&records), 1);
        let found = compare(&plan, &records, &DiffOptions::default());
        let got: Vec<(&str, &str, &str, &str)> = found[0]
            .iter()
            .map(|d| {
                (
                    d.path.as_str(),
                    d.kind.as_str(),
                    d.expected.as_str(),
                    d.actual.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("/shop.Items/M0", "grpc_status", "0", "5"),
                ("/shop.Items/M1", "failed", "", ""),
            ]
        );
    }
}
