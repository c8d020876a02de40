//! The gRPC port's accepted connections, before HTTP/2 takes them: Nagle's
//! algorithm off, and a bound on how long a connection may stay silent
//! before it opens.
//!
//! Without the bound, a connection that never sends a byte is kept until
//! the peer closes it, and a peer that vanished (a host gone, a NAT that
//! forgot the flow) never does: such connections pile up until the daemon
//! runs out of file descriptors and cannot accept its shoppers. Once a
//! connection has opened, HTTP/2 pings find a vanished peer (the server
//! builder's keepalive, `--http2-keepalive-secs`); with TLS, tonic bounds
//! the handshake itself (`--handshake-timeout-secs` too).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// An HTTP/2 client's first bytes (RFC 9113, 3.4); a TLS ClientHello is
/// longer, so either kind of client has sent this many once it speaks.
const OPENING_BYTES: usize = 24;

/// The listener's connections, each with Nagle off (otherwise a response
/// written in more than one segment, a 100-line reservation's, waits for
/// the client's delayed ACK, 40 ms a call: deploy/BENCHMARKS.md) and
/// closed if it has not sent its opening bytes within `within`.
///
/// An accept that fails for want of a resource (no file descriptor left,
/// no memory) is tried again every 100 ms, with a warning at most once a
/// minute: tonic's own loop would try again at once, and the waiting
/// connection that made it fail would have it fail again, a core spinning
/// while the calls on open connections wait for it. Errors of the one
/// connection (reset before it was accepted) are skipped, so the stream
/// never yields an error.
pub fn connections(
    listener: TcpListener,
    within: Duration,
) -> impl tokio_stream::Stream<Item = io::Result<Opening<TcpStream>>> {
    let state = (listener, Failures::default());
    futures_util::stream::unfold(state, move |(listener, mut failures)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let opening = Opening::new(stream, within);
                    return Some((Ok(opening), (listener, failures)));
                }
                Err(e) if of_the_connection(&e) => continue,
                Err(e) => {
                    failures.note(&e);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    })
}

/// Accepts that failed for want of a resource, and when that was last
/// said.
#[derive(Default)]
struct Failures {
    unsaid: u64,
    said_at: Option<tokio::time::Instant>,
}

impl Failures {
    fn note(&mut self, e: &io::Error) {
        self.unsaid += 1;
        if self.said_at.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        tracing::warn!(
            error = %e,
            failed = self.unsaid,
            retry_ms = ACCEPT_RETRY.as_millis() as u64,
            "cannot accept gRPC connections (out of file descriptors? see README, \"Connections\"); new clients wait until connections close"
        );
        self.unsaid = 0;
        self.said_at = Some(tokio::time::Instant::now());
    }
}

/// How often a spell of failed accepts is logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How long to wait before accepting again after an accept failed for want
/// of a resource.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// An accept error that is about the one connection, not the daemon.
fn of_the_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// A connection that fails its reads with `TimedOut` if its first 24
/// bytes (an HTTP/2 client's preface) have not arrived by a deadline; after them it is the
/// connection itself.
pub struct Opening<S> {
    io: S,
    /// Bytes still to come before the deadline is lifted.
    awaited: usize,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Opening<S> {
    fn new(io: S, within: Duration) -> Self {
        Self {
            io,
            awaited: OPENING_BYTES,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opening<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return read;
        };
        if let Poll::Ready(Ok(())) = read {
            this.awaited = this.awaited.saturating_sub(buf.filled().len() - before);
            if this.awaited == 0 {
                this.deadline = None;
            }
            return read;
        }
        if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not open the connection in time (--handshake-timeout-secs)",
            )));
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opening<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Opening<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WITHIN: Duration = Duration::from_millis(200);

    /// A connection that sends nothing, or less than its opening bytes,
    /// fails its read at the deadline; one that sent them all is read as
    /// long as it lasts.
    #[tokio::test]
    async fn a_silent_connection_times_out_and_an_opened_one_does_not() {
        for sent in [0, OPENING_BYTES - 1] {
            let (mut client, server) = tokio::io::duplex(64);
            let mut conn = Opening::new(server, WITHIN);
            client.write_all(&vec![1; sent]).await.unwrap();
            let mut buf = [0; 64];
            if sent > 0 {
                assert_eq!(conn.read(&mut buf).await.unwrap(), sent);
            }
            let error = conn.read(&mut buf).await.expect_err("timed out");
            assert_eq!(error.kind(), io::ErrorKind::TimedOut, "after {sent} bytes");
        }

        let (mut client, server) = tokio::io::duplex(64);
        let mut opened = Opening::new(server, WITHIN);
        client.write_all(&[1; OPENING_BYTES]).await.unwrap();
        let mut buf = [0; 64];
        assert_eq!(opened.read(&mut buf).await.unwrap(), OPENING_BYTES);
        let late = tokio::spawn(async move {
            let n = opened.read(&mut buf).await;
            n.map(|n| buf[..n].to_vec())
        });
        tokio::time::sleep(WITHIN * 3).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(late.await.unwrap().expect("no deadline now"), b"later");
    }
}
