//! Drives a yamux connection from one task so either side can open and accept streams.
//!
//! yamux 0.13 makes progress only while `poll_next_inbound` is polled, so one driver
//! task owns the `Connection` and polls it continuously; other tasks ask it for new
//! outbound streams through [`MuxControl`] and receive inbound streams on a channel.

use std::future::{Future, poll_fn};
use std::task::Poll;

use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;

/// A yamux stream with tokio's I/O traits.
///
/// Poll both directions of one stream from the same task (e.g. `tokio::join!` or
/// `copy_bidirectional`): yamux keeps one waker for a stream's command channel, so
/// halves split across two tasks can lose a wakeup and stall.
pub type MuxStream = Compat<yamux::Stream>;

type OpenReq = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// yamux settings from the edge limits (the CLI uses the defaults).
pub fn config(limits: &Limits) -> yamux::Config {
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(limits.max_streams_per_tunnel);
    cfg.set_max_connection_receive_window(Some(limits.connection_window_bytes));
    // One yamux data frame per forwarded chunk instead of four 16 KiB ones.
    cfg.set_split_send_size(crate::tunnel::CHUNK);
    cfg
}

/// Opens outbound streams on a driven connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct MuxControl {
    open: mpsc::Sender<OpenReq>,
    close: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("the tunnel is closed")]
    Closed,
    #[error("yamux: {0}")]
    Yamux(#[from] yamux::ConnectionError),
}

impl MuxControl {
    pub async fn open_stream(&self) -> Result<MuxStream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.open.send(tx).await.map_err(|_| MuxError::Closed)?;
        Ok(rx.await.map_err(|_| MuxError::Closed)??.compat())
    }

    /// Sends GoAway and closes the connection (streams end).
    pub fn close(&self) {
        self.close.cancel();
    }
}

/// Spawns the driver. Inbound streams beyond `inbound_capacity` waiting to be accepted
/// are refused (dropped), which yamux reports to the peer as a reset.
pub fn spawn<T>(
    mut conn: yamux::Connection<T>,
    inbound_capacity: usize,
) -> (
    MuxControl,
    mpsc::Receiver<MuxStream>,
    tokio::task::JoinHandle<Result<(), yamux::ConnectionError>>,
)
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
{
    let (open_tx, mut open_rx) = mpsc::channel::<OpenReq>(16);
    let (in_tx, in_rx) = mpsc::channel(inbound_capacity.max(1));
    let close = CancellationToken::new();
    let mut cancelled = Box::pin(close.clone().cancelled_owned());
    let task = tokio::spawn(async move {
        let mut pending: Option<OpenReq> = None;
        let mut closing = false;
        poll_fn(move |cx| {
            if !closing && cancelled.as_mut().poll(cx).is_ready() {
                closing = true;
            }
            if closing {
                return conn.poll_close(cx);
            }
            loop {
                if pending.is_none() {
                    match open_rx.poll_recv(cx) {
                        Poll::Ready(Some(r)) => pending = Some(r),
                        _ => break,
                    }
                }
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(res) => {
                        if let Some(p) = pending.take() {
                            let _ = p.send(res);
                        }
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => {
                        let _ = in_tx.try_send(s.compat());
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    });
    (
        MuxControl {
            open: open_tx,
            close,
        },
        in_rx,
        task,
    )
}
