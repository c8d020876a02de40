//! The gRPC port's connections: one that never opens, or whose client
//! stopped answering after it opened, is closed by the daemon; one whose
//! client answers its pings stays up however long it idles. The clients
//! here speak HTTP/2's framing by hand, so each can fall silent exactly
//! where a vanished peer would.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, fresh_database, random_suffix, redis_url, spawn_app_with};

/// What an HTTP/2 client sends first: the preface and an empty SETTINGS
/// frame (RFC 9113, 3.4).
const OPENING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// How a hand-made connection ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The daemon closed it, after sending this many pings.
    Closed { pings: usize },
    /// Still open when the test stopped watching, after this many pings.
    Open { pings: usize },
}

/// Reads the daemon's frames for at most `watch`, answering its pings if
/// `answer` (and acknowledging its settings, as a live client does), and
/// never writing anything else.
async fn watch_frames(stream: &mut TcpStream, answer: bool, watch: Duration) -> Ended {
    let mut pings = 0;
    let read = tokio::time::timeout(watch, async {
        loop {
            let mut header = [0u8; 9];
            if stream.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            if answer && header[3] == SETTINGS && header[4] & ACK == 0 {
                let ack = [0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0];
                if stream.write_all(&ack).await.is_err() {
                    return;
                }
            }
            if header[3] == PING && header[4] & ACK == 0 {
                pings += 1;
                if answer {
                    let mut pong = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
                    pong.extend_from_slice(&payload);
                    if stream.write_all(&pong).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ended::Closed { pings },
        Err(_) => Ended::Open { pings },
    }
}

/// A daemon that pings every second and waits a second for the answer.
async fn pinging_app(handshake_timeout_secs: u64) -> TestApp {
    spawn_app_with(|a| {
        a.handshake_timeout_secs = handshake_timeout_secs;
        a.http2_keepalive_secs = 1;
        a.http2_keepalive_timeout_secs = 1;
    })
    .await
}

/// The daemon still serves a new call.
async fn still_serves(app: &TestApp) {
    assert!(answers(app.channel()).await, "the daemon still serves");
}

#[tokio::test]
async fn a_connection_that_never_opens_is_closed() {
    let app = spawn_app_with(|a| {
        a.handshake_timeout_secs = 1;
        a.http2_keepalive_secs = 0;
    })
    .await;
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let ended = watch_frames(&mut silent, false, Duration::from_secs(30)).await;
    assert_eq!(ended, Ended::Closed { pings: 0 });

    // Half the opening bytes, then silence: the same.
    let mut halting = TcpStream::connect(app.addr).await.unwrap();
    halting.write_all(&OPENING[..12]).await.unwrap();
    let ended = watch_frames(&mut halting, false, Duration::from_secs(30)).await;
    assert_eq!(ended, Ended::Closed { pings: 0 });
    still_serves(&app).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_disconnected() {
    let app = pinging_app(600).await;
    let mut vanished = TcpStream::connect(app.addr).await.unwrap();
    vanished.write_all(OPENING).await.unwrap();
    let ended = watch_frames(&mut vanished, false, Duration::from_secs(30)).await;
    assert!(
        matches!(ended, Ended::Closed { pings } if pings >= 1),
        "{ended:?}"
    );
    still_serves(&app).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected_while_idle() {
    let app = pinging_app(1).await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(OPENING).await.unwrap();
    // Four ping intervals, and past the opening's bound.
    let ended = watch_frames(&mut idle, true, Duration::from_secs(4)).await;
    assert!(
        matches!(ended, Ended::Open { pings } if pings >= 2),
        "{ended:?}"
    );
    app.shutdown().await;
}

/// The daemon as a process of its own (so its file-descriptor limit is
/// its own), with its log in `log`.
struct Process {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl Process {
    async fn start(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::env::temp_dir().join(format!("holdfast-conns-{}.log", random_suffix()));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["serve", "--dev", "--log-format", "text"])
            .args([
                "--grpc-addr",
                &addr.to_string(),
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--redis-prefix", &format!("t{}", random_suffix())])
            .args(args)
            .env("HOLDFAST_REDIS_URL", redis_url())
            .env("HOLDFAST_DATABASE_URL", fresh_database().await)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("the daemon starts");
        Self { child, addr, log }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// A connection once a call gets through it, trying for 30 s.
    async fn connect(&self) -> tonic::transport::Channel {
        for _ in 0..300 {
            let connected = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await;
            if let Ok(channel) = connected
                && answers(channel.clone()).await
            {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the daemon did not answer in 30 s: {}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Its user and system CPU so far, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

/// Whether a call gets its answer (NOT_FOUND for an unknown sale).
async fn answers(channel: tonic::transport::Channel) -> bool {
    let mut client =
        holdfast::grpc::pb::flash_sale_service_client::FlashSaleServiceClient::new(channel);
    let call = client.get_sale(holdfast::grpc::pb::GetSaleRequest {
        sale_id: "nope".into(),
        ..Default::default()
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(5), call).await,
        Ok(Err(status)) if status.code() == tonic::Code::NotFound
    )
}

/// A daemon out of file descriptors keeps serving the connections it has,
/// waits for descriptors instead of spinning on its accept loop (tonic's
/// own loop retried at once, a core busy for as long as the spell lasted),
/// says so (once a minute), and accepts again once connections close.
#[tokio::test]
async fn a_daemon_out_of_file_descriptors_waits_and_accepts_again() {
    let daemon = Process::start(&["--handshake-timeout-secs", "3"]).await;
    let open = daemon.connect().await;
    let limit = daemon.open_fds() + 8;
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &daemon.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success());

    // More silent clients than descriptors left: the kernel queues the
    // rest, which the daemon cannot accept.
    let mut silent = Vec::new();
    for _ in 0..32 {
        silent.push(TcpStream::connect(daemon.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = daemon.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = daemon.cpu_ticks() - before;
    // Two seconds are 200 ticks; a spinning accept loop takes ~all of them.
    assert!(
        spent < 100,
        "the daemon spent {spent} ticks of 200 while out of descriptors"
    );
    assert!(
        answers(open.clone()).await,
        "an open connection is still served"
    );

    drop(silent);
    let again = daemon.connect().await;
    assert!(answers(again).await);
    let log = daemon.log_text();
    assert_eq!(
        log.matches("cannot accept gRPC connections").count(),
        1,
        "one warning a minute: {log}"
    );
    let _ = std::fs::remove_file(&daemon.log);
}
