//! A TCP relay that can hold every byte either way, as a server frozen
//! with SIGSTOP does (or a network that drops packets): nothing is lost,
//! nothing answered until it opens again. For tests that stop one store
//! for one daemon, on servers other tests share.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The relay; it runs until the runtime ends.
pub struct Gate {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    open: watch::Sender<bool>,
}

impl Gate {
    /// A relay to `target` (`host:port`), open.
    pub async fn start(target: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        let target = target.to_string();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, gate.subscribe()));
                tokio::spawn(pump(sr, cw, gate.subscribe()));
            }
        });
        Ok(Self { port, open })
    }

    /// Holds (`false`) or lets through (`true`) what comes next, and what
    /// it held.
    pub fn set(&self, open: bool) {
        self.open.send_replace(open);
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut open: watch::Receiver<bool>) {
    let mut buf = vec![0; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
