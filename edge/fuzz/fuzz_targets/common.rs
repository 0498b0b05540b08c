// Shared by the fuzz targets: turns the fuzzer's bytes into a conversation. Each
// chunk is a header byte (bit 0: direction, the rest: length up to 127) then that many
// bytes, so the fuzzer controls both sides and where every read boundary falls.

use cloudtap_parsers::Direction;

pub fn chunks(data: &[u8]) -> Vec<(Direction, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&h, tail)) = rest.split_first() {
        let dir = if h & 1 == 0 {
            Direction::Up
        } else {
            Direction::Down
        };
        let n = usize::from(h >> 1).min(tail.len());
        out.push((dir, &tail[..n]));
        rest = &tail[n..];
    }
    out
}
