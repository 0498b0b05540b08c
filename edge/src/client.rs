//! Client side of the tunnel port, used by `cloudtapctl` and the tests: log in for a
//! user token, attach to a session, and open streams through it.

use std::sync::Arc;

use cloudtap_proto::tunnel::v1::{
    LoginRequest, StreamHeader, StreamReply, TunnelHello, TunnelHelloReply, TunnelNotice,
    tunnel_hello,
};
use tokio::net::TcpStream;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::config::Limits;
use crate::mux::{self, MuxControl, MuxStream};
use crate::wire::{WireError, read_msg, write_msg};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the edge's tunnel port {addr}: {source}; is cloudtapd running (and is the address right)?"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TLS with the edge at {addr} failed: {source}; check --ca-cert and your client certificate (it must be issued by the edge's CA)"
    )]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the edge refused: {message}")]
    Refused { code: String, message: String },
    #[error("tunnel protocol error: {0}")]
    Wire(#[from] WireError),
    #[error("the tunnel is closed")]
    Closed,
}

impl ClientError {
    /// The edge's refusal code, if the edge refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

async fn connect(
    tls: &Arc<rustls::ClientConfig>,
    addr: &str,
    hello: TunnelHello,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, TunnelHelloReply), ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let name = crate::pki::server_name(addr).map_err(|e| ClientError::Tls {
        addr: addr.into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|source| ClientError::Tls {
            addr: addr.into(),
            source,
        })?;
    write_msg(&mut stream, &hello)
        .await
        .map_err(WireError::from)?;
    // In TLS 1.3 the server verifies the client certificate after the client has
    // finished; a refusal then arrives as an alert on the first read.
    let reply: TunnelHelloReply = read_msg(&mut stream).await.map_err(|e| match e {
        WireError::Io(source) => ClientError::Tls {
            addr: addr.into(),
            source,
        },
        other => ClientError::Wire(other),
    })?;
    if !reply.ok {
        return Err(ClientError::Refused {
            code: reply.code,
            message: reply.error,
        });
    }
    Ok((stream, reply))
}

/// Asks the edge for a user token (mTLS proves the identity).
pub async fn login(
    tls: &Arc<rustls::ClientConfig>,
    tunnel_addr: &str,
    targets: Vec<String>,
    ttl_seconds: u64,
) -> Result<TunnelHelloReply, ClientError> {
    let hello = TunnelHello {
        kind: Some(tunnel_hello::Kind::Login(LoginRequest {
            targets,
            ttl_seconds,
        })),
    };
    Ok(connect(tls, tunnel_addr, hello).await?.1)
}

/// An attached tunnel: opens streams to its target.
#[derive(Debug)]
pub struct Tunnel {
    control: MuxControl,
    notice: tokio::sync::watch::Receiver<Option<TunnelNotice>>,
    notice_task: Option<tokio::task::JoinHandle<()>>,
    driver: tokio::task::JoinHandle<Result<(), yamux::ConnectionError>>,
    target: String,
}

impl Tunnel {
    /// Attaches to a session with its session token.
    pub async fn attach(
        tls: &Arc<rustls::ClientConfig>,
        tunnel_addr: &str,
        session_token: &str,
        target: &str,
    ) -> Result<Tunnel, ClientError> {
        let hello = TunnelHello {
            kind: Some(tunnel_hello::Kind::SessionToken(session_token.into())),
        };
        let (stream, _) = connect(tls, tunnel_addr, hello).await?;
        let conn = yamux::Connection::new(
            stream.compat(),
            mux::config(&Limits::default()),
            yamux::Mode::Client,
        );
        let (control, mut inbound, driver) = mux::spawn(conn, 1);
        let (notice_tx, notice) = tokio::sync::watch::channel(None);
        let closer = control.clone();
        let notice_task = tokio::spawn(async move {
            // The only stream the edge opens carries the reason it ends the session;
            // the edge then waits for this side to close the connection.
            while let Some(mut s) = inbound.recv().await {
                if let Ok(n) = read_msg::<_, TunnelNotice>(&mut s).await {
                    notice_tx.send_replace(Some(n));
                    closer.close();
                }
            }
        });
        Ok(Tunnel {
            control,
            notice,
            notice_task: Some(notice_task),
            driver,
            target: target.into(),
        })
    }

    /// Opens a stream to the tunnel's target; the edge answers before any byte flows.
    pub async fn open_stream(&self, client_addr: &str) -> Result<MuxStream, ClientError> {
        self.opener().open_stream(client_addr).await
    }

    /// A cheap handle that opens streams from other tasks.
    pub fn opener(&self) -> StreamOpener {
        StreamOpener {
            control: self.control.clone(),
            target: self.target.clone(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.driver.is_finished()
    }

    /// Resolves when the connection ends (edge closed it, or the network failed).
    pub async fn closed(&mut self) {
        let _ = (&mut self.driver).await;
        if let Some(t) = self.notice_task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), t).await;
        }
    }

    /// Why the edge ended the session, when it said so.
    pub fn notice(&self) -> Option<TunnelNotice> {
        self.notice.borrow().clone()
    }

    pub fn close(&self) {
        self.control.close();
    }
}

/// Opens streams on a tunnel; cheap to clone and send to other tasks.
#[derive(Debug, Clone)]
pub struct StreamOpener {
    control: MuxControl,
    target: String,
}

impl StreamOpener {
    pub async fn open_stream(&self, client_addr: &str) -> Result<MuxStream, ClientError> {
        let header = StreamHeader {
            target: self.target.clone(),
            protocol_hint: String::new(),
            client_addr: client_addr.into(),
        };
        self.open_with_header(&header).await
    }

    /// Opens a stream with an arbitrary header (tests of refusals use this).
    pub async fn open_with_header(&self, header: &StreamHeader) -> Result<MuxStream, ClientError> {
        let mut s = self
            .control
            .open_stream()
            .await
            .map_err(|_| ClientError::Closed)?;
        write_msg(&mut s, header).await.map_err(WireError::from)?;
        let reply: StreamReply = read_msg(&mut s).await?;
        if !reply.ok {
            return Err(ClientError::Refused {
                code: reply.code,
                message: reply.error,
            });
        }
        Ok(s)
    }

    /// A raw stream with nothing sent yet (tests of malformed headers).
    pub async fn open_raw(&self) -> Result<MuxStream, ClientError> {
        self.control
            .open_stream()
            .await
            .map_err(|_| ClientError::Closed)
    }
}
