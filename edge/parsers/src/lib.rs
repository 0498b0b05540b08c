//! The parsers of the edge's HTTP mirror (`cloudtap-edge`'s `mirror` module): an
//! incremental HTTP/1.x parser ([`http1`]) and an HTTP/2 + gRPC one ([`http2`]), each fed
//! copies of both directions of one stream and producing [`http1::Event`]s. Pure: no
//! I/O, no clock, no allocation a peer can grow without bound. A crate of its own so
//! that `edge/fuzz` can fuzz it without building the edge's whole dependency tree.

pub mod http1;
pub mod http2;

/// Which way bytes went: `Up` is client → target, `Down` is target → client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}
