//! `capture.pcapng`: TCP/IP packets synthesized from the stored stream bytes, so
//! Wireshark's "Follow TCP Stream" (and `tshark -z follow,tcp,…`) shows each
//! conversation.
//!
//! Per stream: a handshake at its `stream_opened` time, one segment per stored chunk
//! of at most [`MSS`] bytes at its frame's time, with sequence numbers from the frame's
//! byte offset (so a chunk that was not stored leaves a hole Wireshark reports as
//! "previous segment not captured"), and FINs at its `stream_closed` time. Addresses
//! are the recorded ones when both are IPv4; otherwise documentation addresses
//! (192.0.2.1 → 198.51.100.1) stand in and a packet comment gives the real ones. A
//! stream whose payload was not stored keeps its handshake and FINs (placed by the byte
//! counts) and says its sizes in a comment. Checksums are correct; timestamps are
//! nanoseconds.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use cloudtap_schemas::{Body, Direction, Record};

/// Payload bytes per synthesized segment.
pub const MSS: usize = 1448;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

struct Packet {
    ts: i64,
    /// Order among packets of the same time: keeps a stream's packets in sequence.
    order: u64,
    data: Vec<u8>,
    comment: Option<String>,
}

#[derive(Default)]
struct Stream<'a> {
    opened: Option<(i64, &'a cloudtap_schemas::StreamOpened)>,
    closed: Option<(i64, &'a cloudtap_schemas::StreamClosed)>,
    frames: Vec<(i64, &'a cloudtap_schemas::Frame)>,
}

/// The pcapng file of every stream in `records`.
pub fn pcapng(records: &[Record]) -> Vec<u8> {
    let mut targets: BTreeMap<Uuid, &str> = BTreeMap::new();
    let mut streams: BTreeMap<(Uuid, u64), Stream> = BTreeMap::new();
    for r in records {
        match &r.body {
            Body::SessionOpened(o) => {
                targets.insert(r.chain_id, &o.target);
            }
            Body::StreamOpened(o) => {
                streams.entry((r.chain_id, o.stream_id)).or_default().opened =
                    Some((r.ts_unix_nanos, o))
            }
            Body::StreamClosed(c) => {
                streams.entry((r.chain_id, c.stream_id)).or_default().closed =
                    Some((r.ts_unix_nanos, c))
            }
            Body::Frame(f) => streams
                .entry((r.chain_id, f.stream_id))
                .or_default()
                .frames
                .push((r.ts_unix_nanos, f)),
            _ => {}
        }
    }
    let mut packets = Vec::new();
    let mut order = 0u64;
    for ((session, id), s) in &streams {
        let target = targets.get(session).copied().unwrap_or("");
        stream_packets(*session, *id, target, s, &mut packets, &mut order);
    }
    packets.sort_by_key(|p| (p.ts, p.order));
    let mut out = Vec::new();
    section_header(&mut out);
    interface(&mut out);
    for p in &packets {
        enhanced_packet(&mut out, p);
    }
    out
}

fn isn(session: Uuid, stream: u64, side: u8) -> u32 {
    let mut h = Sha256::new();
    h.update(session.as_bytes());
    h.update(stream.to_be_bytes());
    h.update([side]);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn v4(addr: &str) -> Option<(Ipv4Addr, u16)> {
    match addr.parse::<SocketAddr>().ok()? {
        SocketAddr::V4(a) => Some((*a.ip(), a.port())),
        SocketAddr::V6(_) => None,
    }
}

fn stream_packets(
    session: Uuid,
    id: u64,
    target: &str,
    s: &Stream,
    out: &mut Vec<Packet>,
    order: &mut u64,
) {
    let (client_addr, upstream_addr) = s
        .opened
        .map(|(_, o)| (o.client_addr.as_str(), o.upstream_addr.as_str()))
        .unwrap_or(("", ""));
    let mut notes = vec![format!(
        "cloudtap session {session} stream {id}{}",
        if target.is_empty() {
            String::new()
        } else {
            format!(" to {target}")
        }
    )];
    let (client, server) = match (v4(client_addr), v4(upstream_addr)) {
        (Some(c), Some(u)) => (c, u),
        _ => {
            // Distinct ports per stream keep Wireshark's conversations apart.
            let port = 49152 + (id % 16384) as u16;
            notes.push(format!(
                "addresses stand in for client {client_addr:?} and upstream {upstream_addr:?}"
            ));
            (
                (Ipv4Addr::new(192, 0, 2, 1), port),
                (
                    Ipv4Addr::new(198, 51, 100, 1),
                    upstream_addr
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .unwrap_or(80),
                ),
            )
        }
    };
    let (c_isn, s_isn) = (isn(session, id, 0), isn(session, id, 1));
    let first_ts = s
        .opened
        .map(|(t, _)| t)
        .or_else(|| s.frames.first().map(|(t, _)| *t))
        .or_else(|| s.closed.map(|(t, _)| t))
        .unwrap_or(0);
    let stored: u64 = s
        .frames
        .iter()
        .filter(|(_, f)| f.payload.is_some())
        .map(|(_, f)| f.length as u64)
        .sum();
    let (mut up_total, mut down_total) = (0u64, 0u64);
    for (_, f) in &s.frames {
        let end = f.offset + f.length as u64;
        match f.direction {
            Direction::Up => up_total = up_total.max(end),
            Direction::Down => down_total = down_total.max(end),
        }
    }
    if let Some((_, c)) = s.closed {
        up_total = up_total.max(c.bytes_up);
        down_total = down_total.max(c.bytes_down);
    }
    if stored == 0 {
        notes.push(format!(
            "payload not stored (capture level or a parse failure): {up_total} bytes client to server, {down_total} bytes server to client"
        ));
    }
    let mut push = |ts: i64,
                    up: bool,
                    seq: u32,
                    ack: u32,
                    flags: u8,
                    payload: &[u8],
                    comment: Option<String>| {
        let (src, dst) = if up {
            (client, server)
        } else {
            (server, client)
        };
        *order += 1;
        out.push(Packet {
            ts,
            order: *order,
            data: frame(src, dst, up, seq, ack, flags, payload),
            comment,
        });
    };
    // Handshake.
    push(first_ts, true, c_isn, 0, SYN, &[], Some(notes.join("; ")));
    push(
        first_ts,
        false,
        s_isn,
        c_isn.wrapping_add(1),
        SYN | ACK,
        &[],
        None,
    );
    push(
        first_ts,
        true,
        c_isn.wrapping_add(1),
        s_isn.wrapping_add(1),
        ACK,
        &[],
        None,
    );

    // Data: what the peer has sent so far is what each segment acknowledges.
    let (mut up_next, mut down_next) = (0u64, 0u64);
    let mut frames = s.frames.clone();
    frames.sort_by_key(|(t, f)| (*t, f.direction == Direction::Down, f.offset));
    for (ts, f) in frames {
        let up = f.direction == Direction::Up;
        let Some(payload) = &f.payload else {
            continue;
        };
        let (mine, theirs) = if up {
            (&mut up_next, down_next)
        } else {
            (&mut down_next, up_next)
        };
        let comment = (f.offset > *mine).then(|| {
            format!(
                "cloudtap: {} bytes before this segment were not stored",
                f.offset - *mine
            )
        });
        *mine = (*mine).max(f.offset + payload.len() as u64);
        let (my_isn, their_isn) = if up { (c_isn, s_isn) } else { (s_isn, c_isn) };
        let ack = their_isn.wrapping_add(1).wrapping_add(theirs as u32);
        let chunks: Vec<&[u8]> = payload.chunks(MSS).collect();
        let n = chunks.len();
        let mut comment = comment;
        for (i, c) in chunks.into_iter().enumerate() {
            let off = f.offset + (i * MSS) as u64;
            let seq = my_isn.wrapping_add(1).wrapping_add(off as u32);
            let flags = if i + 1 == n { ACK | PSH } else { ACK };
            push(ts, up, seq, ack, flags, c, comment.take());
        }
    }

    // Close: FINs after all bytes either side sent.
    if let Some((ts, _)) = s.closed {
        let c_fin = c_isn.wrapping_add(1).wrapping_add(up_total as u32);
        let s_fin = s_isn.wrapping_add(1).wrapping_add(down_total as u32);
        push(ts, true, c_fin, s_fin, FIN | ACK, &[], None);
        push(
            ts,
            false,
            s_fin,
            c_fin.wrapping_add(1),
            FIN | ACK,
            &[],
            None,
        );
        push(
            ts,
            true,
            c_fin.wrapping_add(1),
            s_fin.wrapping_add(1),
            ACK,
            &[],
            None,
        );
    }
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for p in parts {
        for &b in *p {
            match odd.take() {
                None => odd = Some(b),
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/TCP frame.
fn frame(
    (src_ip, src_port): (Ipv4Addr, u16),
    (dst_ip, dst_port): (Ipv4Addr, u16),
    up: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src_port.to_be_bytes());
    tcp.extend_from_slice(&dst_port.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4); // data offset: 20 bytes
    tcp.push(flags);
    tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(payload);
    let tcp_len = tcp.len() as u16;
    let pseudo = [
        &src_ip.octets()[..],
        &dst_ip.octets()[..],
        &[0, 6],
        &tcp_len.to_be_bytes(),
    ]
    .concat();
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut ip = Vec::with_capacity(20);
    ip.push(0x45);
    ip.push(0);
    ip.extend_from_slice(&(20 + tcp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
    ip.push(64); // TTL
    ip.push(6); // TCP
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&src_ip.octets());
    ip.extend_from_slice(&dst_ip.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let (src_mac, dst_mac) = if up {
        (CLIENT_MAC, SERVER_MAC)
    } else {
        (SERVER_MAC, CLIENT_MAC)
    };
    let mut out = Vec::with_capacity(14 + ip.len() + tcp.len());
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&tcp);
    out
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.extend(std::iter::repeat_n(0, pad4(value.len())));
}

fn end_of_options(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0, 0]);
}

fn block(out: &mut Vec<u8>, kind: u32, body: &[u8]) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

fn section_header(out: &mut Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(-1i64).to_le_bytes()); // section length unknown
    let app = format!("cloudtap {}", env!("CARGO_PKG_VERSION"));
    option(&mut b, 4, app.as_bytes()); // shb_userappl
    end_of_options(&mut b);
    block(out, 0x0A0D_0D0A, &b);
}

fn interface(out: &mut Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(&1u16.to_le_bytes()); // LINKTYPE_ETHERNET
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // no snap length
    option(&mut b, 2, b"cloudtap-synthesized"); // if_name
    option(&mut b, 9, &[9]); // if_tsresol: nanoseconds
    end_of_options(&mut b);
    block(out, 1, &b);
}

fn enhanced_packet(out: &mut Vec<u8>, p: &Packet) {
    let ts = p.ts.max(0) as u64;
    let mut b = Vec::with_capacity(32 + p.data.len());
    b.extend_from_slice(&0u32.to_le_bytes()); // interface 0
    b.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
    b.extend_from_slice(&(ts as u32).to_le_bytes());
    b.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
    b.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
    b.extend_from_slice(&p.data);
    b.extend(std::iter::repeat_n(0, pad4(p.data.len())));
    if let Some(c) = &p.comment {
        option(&mut b, 1, c.as_bytes()); // opt_comment
        end_of_options(&mut b);
    }
    block(out, 6, &b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::{ChainWriter, Frame, StreamClosed, StreamOpened};

    #[test]
    fn checksums_verify_and_sequence_numbers_follow_offsets() {
        let mut w = ChainWriter::new(Uuid::now_v7());
        let payload = vec![7u8; 3000];
        let records = vec![
            w.seal(
                10,
                Body::StreamOpened(StreamOpened {
                    stream_id: 0,
                    client_addr: "127.0.0.1:5000".into(),
                    upstream_addr: "127.0.0.1:80".into(),
                    ..Default::default()
                }),
            ),
            w.seal(
                20,
                Body::Frame(Frame {
                    stream_id: 0,
                    direction: Direction::Up,
                    offset: 0,
                    length: 3000,
                    payload: Some(payload),
                }),
            ),
            w.seal(
                30,
                Body::StreamClosed(StreamClosed {
                    stream_id: 0,
                    bytes_up: 3000,
                    ..Default::default()
                }),
            ),
        ];
        let file = pcapng(&records);
        // SHB, IDB, then 3 handshake + 3 data (3000 / 1448) + 3 closing packets.
        let mut at = 0;
        let mut blocks = Vec::new();
        while at < file.len() {
            let kind = u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(file[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            assert_eq!(&file[at + 4..at + 8], &file[at + len - 4..at + len]);
            blocks.push((kind, &file[at + 8..at + len - 4]));
            at += len;
        }
        assert_eq!(blocks.len(), 2 + 9);
        let data: Vec<&[u8]> = blocks[2..]
            .iter()
            .map(|(k, b)| {
                assert_eq!(*k, 6);
                let n = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
                &b[20..20 + n]
            })
            .collect();
        let seq = |p: &[u8]| u32::from_be_bytes(p[14 + 20 + 4..14 + 20 + 8].try_into().unwrap());
        let syn = seq(data[0]);
        for (i, p) in data[3..6].iter().enumerate() {
            assert_eq!(seq(p), syn.wrapping_add(1 + (i * MSS) as u32));
            // IPv4 header and TCP (with its pseudo-header) checksums sum to zero.
            assert_eq!(checksum(&[&p[14..34]]), 0);
            let tcp = &p[34..];
            let pseudo = [&p[26..34], &[0, 6], &(tcp.len() as u16).to_be_bytes()[..]].concat();
            assert_eq!(checksum(&[&pseudo, tcp]), 0);
        }
        assert_eq!(seq(data[6]), syn.wrapping_add(1 + 3000));
    }
}
