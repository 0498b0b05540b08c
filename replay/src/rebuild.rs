//! A captured session, rebuilt from its records for sending again.

use std::collections::{BTreeMap, HashSet};

use cloudtap_schemas::{Body, Direction, ExchangePhase, HttpExchange, Record};

use crate::ReplayError;

/// What a session sent and received, in the order it happened.
#[derive(Debug, Clone)]
pub struct Recording {
    pub session_id: String,
    pub identity: String,
    pub target: String,
    pub opened_at: i64,
    /// HTTP exchanges and opaque streams, by start time.
    pub items: Vec<Item>,
}

#[derive(Debug, Clone)]
pub enum Item {
    /// One request and its recorded response (a `complete` exchange, or the `start`
    /// of a long-lived one).
    Http(Box<HttpExchange>),
    Stream(OpaqueStream),
}

impl Item {
    /// When it started, unix nanoseconds.
    pub fn at(&self) -> i64 {
        match self {
            Item::Http(x) => x.start_unix_nanos,
            Item::Stream(s) => s.opened_at,
        }
    }
}

/// A stream the edge did not parse as HTTP: its bytes, as captured at level `full`.
#[derive(Debug, Clone, Default)]
pub struct OpaqueStream {
    pub stream_id: u64,
    pub opened_at: i64,
    pub protocol_hint: String,
    /// Client → target chunks as forwarded, with the time each was seen.
    pub up: Vec<(i64, Vec<u8>)>,
    pub up_len: u64,
    /// Target → client bytes as recorded.
    pub down: Vec<u8>,
    pub down_len: u64,
    /// Some frames carry no payload (capture level `metadata`, or a parse failure).
    pub missing_payload: bool,
    /// For an HTTP/2 (gRPC) stream captured `full`: the exchanges the edge mirrored
    /// from it. Its bytes are re-sent as they were, and the answer is compared exchange
    /// by exchange with what the edge mirrors of the replay (HPACK and frame layout
    /// differ between any two connections, so the bytes themselves are not compared).
    pub mirrored: Vec<HttpExchange>,
    /// The first hole in the recorded bytes, if records were lost (a `gap`).
    pub hole: Option<String>,
    /// When the last client→target and target→client bytes were seen: how long the
    /// target took to finish answering, which a replay waits for too.
    pub last_up_at: i64,
    pub last_down_at: i64,
}

/// Whether an exchange was parsed from an HTTP/1 stream (replayed from its record) or
/// from HTTP/2 (replayed from the stream's bytes, when captured `full`).
pub fn is_http1(x: &HttpExchange) -> bool {
    x.protocol.starts_with("HTTP/1") && x.grpc_service.is_empty()
}

impl Recording {
    /// Rebuilds a session from its chain's records (any order; duplicates of a seq
    /// are dropped, as every reader of the log does).
    pub fn from_records(session: &str, records: &[Record]) -> Result<Self, ReplayError> {
        if records.is_empty() {
            return Err(ReplayError::NotFound(session.into()));
        }
        let mut records: Vec<&Record> = records.iter().collect();
        records.sort_by_key(|r| r.seq);
        records.dedup_by_key(|r| r.seq);
        let opened = records
            .iter()
            .find_map(|r| match &r.body {
                Body::SessionOpened(o) => Some((r.ts_unix_nanos, o)),
                _ => None,
            })
            .ok_or_else(|| ReplayError::Rebuild {
                session: session.into(),
                reason: "its session_opened record is missing".into(),
            })?;
        let http_streams: HashSet<u64> = records
            .iter()
            .filter_map(|r| match &r.body {
                Body::HttpExchange(x) if is_http1(x) => Some(x.stream_id),
                _ => None,
            })
            .collect();
        // Exchanges of HTTP/2 streams, by stream: replayed with the stream's bytes.
        let mut h2: BTreeMap<u64, Vec<HttpExchange>> = BTreeMap::new();
        let mut items = Vec::new();
        let mut streams: BTreeMap<u64, OpaqueStream> = BTreeMap::new();
        // Down frames by offset, so bytes land where they belong even if the records
        // were read out of order.
        let mut down: BTreeMap<u64, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
        for r in &records {
            match &r.body {
                Body::HttpExchange(x) if !is_http1(x) => {
                    h2.entry(x.stream_id).or_default().push((**x).clone());
                }
                Body::HttpExchange(x) => {
                    if matches!(x.phase, ExchangePhase::Complete | ExchangePhase::Start) {
                        items.push(Item::Http(x.clone()));
                    }
                }
                Body::StreamOpened(s) if !http_streams.contains(&s.stream_id) => {
                    let st = streams.entry(s.stream_id).or_default();
                    st.stream_id = s.stream_id;
                    st.opened_at = r.ts_unix_nanos;
                    st.protocol_hint.clone_from(&s.protocol_hint);
                }
                Body::Frame(f) if !http_streams.contains(&f.stream_id) => {
                    let st = streams.entry(f.stream_id).or_insert_with(|| OpaqueStream {
                        stream_id: f.stream_id,
                        opened_at: r.ts_unix_nanos,
                        ..Default::default()
                    });
                    let Some(p) = &f.payload else {
                        st.missing_payload = true;
                        match f.direction {
                            Direction::Up => st.up_len += u64::from(f.length),
                            Direction::Down => st.down_len += u64::from(f.length),
                        }
                        continue;
                    };
                    match f.direction {
                        Direction::Up => {
                            // Records lost on the way (a `drop` route's gap) leave a
                            // hole: what is left cannot be sent as it was.
                            if f.offset != st.up_len && st.hole.is_none() {
                                st.hole = Some(format!(
                                    "bytes {}..{} sent to the target were not logged",
                                    st.up_len, f.offset
                                ));
                            }
                            st.up_len = f.offset + p.len() as u64;
                            st.up.push((r.ts_unix_nanos, p.clone()));
                            st.last_up_at = r.ts_unix_nanos;
                        }
                        Direction::Down => {
                            st.down_len += p.len() as u64;
                            st.last_down_at = st.last_down_at.max(r.ts_unix_nanos);
                            down.entry(f.stream_id)
                                .or_default()
                                .insert(f.offset, p.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        for (id, mut st) in streams {
            if let Some(chunks) = down.remove(&id) {
                for (offset, bytes) in chunks {
                    if offset != st.down.len() as u64 && st.hole.is_none() {
                        st.hole = Some(format!(
                            "bytes {}..{offset} the target sent were not logged",
                            st.down.len()
                        ));
                    }
                    st.down.extend(bytes);
                }
            }
            if let Some(xs) = h2.remove(&id) {
                if st.missing_payload || st.up.is_empty() {
                    // Not captured `full`: only the exchange records are left, which
                    // cannot be re-sent as HTTP/2; the plan says so for each.
                    items.extend(
                        xs.into_iter()
                            .filter(|x| x.phase != ExchangePhase::Message)
                            .map(|x| Item::Http(Box::new(x))),
                    );
                    continue;
                }
                st.mirrored = xs;
            }
            items.push(Item::Stream(st));
        }
        // HTTP/2 exchanges of streams whose frames were not read at all.
        for xs in h2.into_values() {
            items.extend(
                xs.into_iter()
                    .filter(|x| x.phase != ExchangePhase::Message)
                    .map(|x| Item::Http(Box::new(x))),
            );
        }
        items.sort_by_key(Item::at);
        Ok(Recording {
            session_id: session.into(),
            identity: opened.1.identity.clone(),
            target: opened.1.target.clone(),
            opened_at: opened.0,
            items,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::{ChainWriter, Frame, SessionOpened, StreamOpened};

    #[test]
    fn opaque_streams_keep_their_bytes_and_timings_and_http_streams_their_exchanges() {
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        let mut recs = vec![w.seal(
            1,
            Body::SessionOpened(SessionOpened {
                identity: "alice".into(),
                target: "db".into(),
                ..Default::default()
            }),
        )];
        recs.push(w.seal(
            2,
            Body::StreamOpened(StreamOpened {
                stream_id: 1,
                ..Default::default()
            }),
        ));
        for (ts, dir, off, p) in [
            (3, Direction::Up, 0, b"ping".as_slice()),
            (4, Direction::Down, 0, b"po".as_slice()),
            (5, Direction::Down, 2, b"ng".as_slice()),
            (9, Direction::Up, 4, b"bye".as_slice()),
        ] {
            recs.push(w.seal(
                ts,
                Body::Frame(Frame {
                    stream_id: 1,
                    direction: dir,
                    offset: off,
                    length: p.len() as u32,
                    payload: Some(p.to_vec()),
                }),
            ));
        }
        let mut x = HttpExchange {
            stream_id: 2,
            method: "GET".into(),
            path: "/a".into(),
            start_unix_nanos: 7,
            ..Default::default()
        };
        recs.push(w.seal(8, Body::HttpExchange(Box::new(x.clone()))));
        x.phase = ExchangePhase::Message;
        recs.push(w.seal(8, Body::HttpExchange(Box::new(x))));
        recs.push(w.seal(
            8,
            Body::Frame(Frame {
                stream_id: 2,
                direction: Direction::Up,
                offset: 0,
                length: 10,
                payload: None,
            }),
        ));
        recs.reverse();
        let rec = Recording::from_records("s", &recs).unwrap();
        assert_eq!(
            (rec.identity.as_str(), rec.target.as_str()),
            ("alice", "db")
        );
        assert_eq!(rec.items.len(), 2, "{:?}", rec.items);
        let Item::Stream(s) = &rec.items[0] else {
            panic!("the stream opened first")
        };
        assert_eq!(s.up, vec![(3, b"ping".to_vec()), (9, b"bye".to_vec())]);
        assert_eq!(s.down, b"pong");
        assert!(!s.missing_payload);
        assert!(matches!(&rec.items[1], Item::Http(x) if x.path == "/a"));
    }

    #[test]
    fn lost_records_leave_a_hole_that_is_named() {
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        let mut recs = vec![w.seal(1, Body::SessionOpened(SessionOpened::default()))];
        for (off, p) in [(0, b"abcd".as_slice()), (10, b"xy".as_slice())] {
            recs.push(w.seal(
                2,
                Body::Frame(Frame {
                    stream_id: 1,
                    direction: Direction::Up,
                    offset: off,
                    length: p.len() as u32,
                    payload: Some(p.to_vec()),
                }),
            ));
        }
        let rec = Recording::from_records("s", &recs).unwrap();
        let Item::Stream(s) = &rec.items[0] else {
            panic!()
        };
        assert_eq!(
            s.hole.as_deref(),
            Some("bytes 4..10 sent to the target were not logged")
        );
    }

    #[test]
    fn nothing_to_rebuild_is_not_found() {
        assert!(matches!(
            Recording::from_records("s", &[]),
            Err(ReplayError::NotFound(_))
        ));
    }
}
