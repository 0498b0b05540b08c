//! Length-prefixed protobuf messages on the tunnel port: a u32 big-endian length,
//! then that many bytes of one message. Used for the hello and for stream headers.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest hello, header or reply accepted (they are a few hundred bytes in practice).
pub const MAX_MESSAGE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed before the message was complete")]
    Eof,
    #[error("message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("message is not valid protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub async fn write_msg<W: AsyncWrite + Unpin, M: Message>(w: &mut W, m: &M) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

pub async fn read_msg<R: AsyncRead + Unpin, M: Message + Default>(
    r: &mut R,
) -> Result<M, WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(eof)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(eof)?;
    Ok(M::decode(body.as_slice())?)
}

fn eof(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Eof
    } else {
        WireError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_proto::tunnel::v1::StreamHeader;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let h = StreamHeader {
            target: "db".into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &h).await.unwrap();
        let got: StreamHeader = read_msg(&mut buf.as_slice()).await.unwrap();
        assert_eq!(got, h);
        let big = (MAX_MESSAGE as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_msg::<_, StreamHeader>(&mut &big[..]).await,
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            read_msg::<_, StreamHeader>(&mut &buf[..3]).await,
            Err(WireError::Eof)
        ));
        let garbage = [0, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(
            read_msg::<_, StreamHeader>(&mut &garbage[..]).await,
            Err(WireError::Decode(_))
        ));
    }
}
