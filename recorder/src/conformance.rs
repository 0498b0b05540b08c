//! The conformance suite every [`EventLog`] backend runs unchanged.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use cloudtap_schemas::{Audit, Body, ChainWriter, Record, verify_chain};

use crate::{EventLog, Offsets, Position};

fn records(w: &mut ChainWriter, n: usize, tag: &str) -> Vec<Record> {
    (0..n)
        .map(|i| {
            w.seal_now(Body::Audit(Audit {
                actor: tag.into(),
                action: format!("{tag}-{i}"),
                detail: "x".repeat(i % 7),
            }))
        })
        .collect()
}

/// Runs every scenario, each on a fresh log from `make`.
pub async fn run_all<F, Fut, L>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<L>>,
    L: EventLog,
{
    append_then_read_back(make().await).await;
    subscribe_sees_old_and_new(make().await).await;
    concurrent_appenders_keep_per_task_order(make().await).await;
    empty_batch_is_a_no_op(make().await).await;
    subscribe_kinds_yields_only_those_kinds(make().await).await;
    read_to_stops_at_the_end_given(make().await).await;
}

async fn read_to_stops_at_the_end_given<L: EventLog>(log: Arc<L>) {
    let mut a = ChainWriter::new(uuid::Uuid::now_v7());
    let mut b = ChainWriter::new(uuid::Uuid::now_v7());
    let before = [records(&mut a, 4, "a"), records(&mut b, 3, "b")].concat();
    log.append(before.clone()).await.unwrap();
    let end = log.end().await.unwrap();
    log.append(records(&mut a, 2, "late")).await.unwrap();
    let got: Vec<Record> = tokio::time::timeout(
        Duration::from_secs(10),
        crate::read_to(log.as_ref(), end)
            .map(|e| e.unwrap().record)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("read_to must finish at the end it was given");
    let mut got_sorted = got.clone();
    got_sorted.sort_by_key(|r| (r.chain_id, r.seq));
    let mut want = before;
    want.sort_by_key(|r| (r.chain_id, r.seq));
    assert_eq!(got_sorted, want);
}

async fn subscribe_kinds_yields_only_those_kinds<L: EventLog>(log: Arc<L>) {
    use cloudtap_schemas::{Control, ControlAction};
    let mut w = ChainWriter::new(uuid::Uuid::now_v7());
    let mut batch = records(&mut w, 3, "k");
    let control = w.seal_now(Body::Control(Control {
        action: ControlAction::Close,
        subject: "s".into(),
        reason: String::new(),
        actor: "a".into(),
    }));
    batch.push(control.clone());
    batch.extend(records(&mut w, 2, "k"));
    log.append(batch).await.unwrap();
    let mut sub = log.subscribe_kinds(Offsets::default(), &["control"]);
    let got = next(&mut sub).await;
    assert_eq!((got.position.offset, &got.record), (3, &control));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub.next())
            .await
            .is_err()
    );
}

async fn append_then_read_back<L: EventLog>(log: Arc<L>) {
    let mut a = ChainWriter::new(uuid::Uuid::now_v7());
    let mut b = ChainWriter::new(uuid::Uuid::now_v7());
    let ra1 = records(&mut a, 3, "a");
    let rb = records(&mut b, 4, "b");
    let ra2 = records(&mut a, 2, "a");
    // Offsets are per partition; one chain always lands in one partition, in order.
    let pa1 = log.append(ra1.clone()).await.unwrap();
    let pb = log.append(rb.clone()).await.unwrap();
    let pa2 = log.append(ra2.clone()).await.unwrap();
    assert_eq!(pa1.offset, 2, "a fresh log's partition starts at offset 0");
    assert_eq!(pa2.partition, pa1.partition, "one chain, one partition");
    let b_before = if pb.partition == pa1.partition { 3 } else { 0 };
    assert_eq!(pb.offset, b_before + 3);
    assert_eq!(
        pa2.offset,
        pa1.offset + 2 + if b_before > 0 { 4 } else { 0 }
    );
    assert_eq!(log.end().await.unwrap().total(), 9);
    let chain_a = log.read_chain(a.chain_id()).await.unwrap();
    assert_eq!(chain_a, [ra1, ra2].concat());
    assert_eq!(verify_chain(None, &chain_a).unwrap(), 5);
    assert_eq!(log.read_chain(b.chain_id()).await.unwrap(), rb);
    assert!(
        log.read_chain(uuid::Uuid::now_v7())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn subscribe_sees_old_and_new<L: EventLog>(log: Arc<L>) {
    let mut w = ChainWriter::new(uuid::Uuid::now_v7());
    let first = records(&mut w, 5, "s");
    let head = log.append(first[..2].to_vec()).await.unwrap();
    log.append(first[2..].to_vec()).await.unwrap();
    let mut from = Offsets::default();
    from.advance(head);
    let mut sub = log.subscribe(from);
    for (i, want) in first[2..].iter().enumerate() {
        let got = next(&mut sub).await;
        assert_eq!(
            got.position,
            Position {
                partition: head.partition,
                offset: head.offset + 1 + i as u64
            }
        );
        assert_eq!(&got.record, want);
    }
    // Nothing more yet: the subscriber waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub.next())
            .await
            .is_err()
    );
    let more = records(&mut w, 3, "s");
    log.append(more.clone()).await.unwrap();
    for want in &more {
        assert_eq!(&next(&mut sub).await.record, want);
    }
}

async fn concurrent_appenders_keep_per_task_order<L: EventLog>(log: Arc<L>) {
    let mut tasks = Vec::new();
    let mut chains = Vec::new();
    for t in 0..4 {
        let log = log.clone();
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        chains.push(w.chain_id());
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            for _ in 0..25 {
                let pos = log
                    .append(records(&mut w, 2, &format!("t{t}")))
                    .await
                    .unwrap();
                assert!(
                    last.is_none_or(|l| pos > l),
                    "positions must grow per appender"
                );
                last = Some(pos);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(log.end().await.unwrap().total(), 200);
    for c in chains {
        let chain = log.read_chain(c).await.unwrap();
        assert_eq!(verify_chain(None, &chain).unwrap(), 50);
    }
}

async fn empty_batch_is_a_no_op<L: EventLog>(log: Arc<L>) {
    log.append(Vec::new()).await.unwrap();
    assert_eq!(log.end().await.unwrap().total(), 0);
    // read_to on an empty log finishes at once.
    let all: Vec<_> = crate::read_to(log.as_ref(), Offsets::default())
        .collect()
        .await;
    assert!(all.is_empty());
}

async fn next(
    sub: &mut futures::stream::BoxStream<'static, Result<crate::LogEntry, crate::LogError>>,
) -> crate::LogEntry {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("waited 10 s for a record from subscribe")
        .expect("subscription ended")
        .expect("subscription failed")
}
