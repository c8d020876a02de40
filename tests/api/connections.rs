//! The gRPC port's connections: one that never opens, or whose client
//! stopped answering after it opened, is closed by the daemon; one whose
//! client answers its pings stays up however long it idles; one whose
//! client cancels many calls before the daemon took them up is not closed
//! for it. The clients here speak HTTP/2's framing by hand, so each can
//! fall silent, or cancel, exactly where a real one would.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, fresh_database, random_suffix, redis_url, spawn_app_with};
use crate::tls::get_sale;

/// What an HTTP/2 client sends first: the preface and an empty SETTINGS
/// frame (RFC 9113, 3.4).
const OPENING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

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
            let reply = match (header[3], header[4] & ACK) {
                (SETTINGS, 0) => Some(frame(SETTINGS, ACK, 0, &[])),
                (PING, 0) => {
                    pings += 1;
                    Some(frame(PING, ACK, 0, &payload))
                }
                _ => None,
            };
            if let Some(reply) = reply.filter(|_| answer)
                && stream.write_all(&reply).await.is_err()
            {
                return;
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

/// A client that vanished (it neither reads nor answers) does not hold up
/// a shutdown past `--shutdown-grace-secs`: HTTP/2's graceful close waits
/// for the client to answer a ping, which it never will.
#[tokio::test]
async fn a_vanished_client_does_not_hold_up_a_shutdown() {
    let app = spawn_app_with(|a| a.shutdown_grace_secs = 1).await;
    let mut vanished = TcpStream::connect(app.addr).await.unwrap();
    vanished.write_all(OPENING).await.unwrap();
    still_serves(&app).await;
    // TestApp::shutdown fails the test if the daemon takes over 30 s.
    app.shutdown().await;
    drop(vanished);
}

/// A health check's request headers, HPACK-encoded by hand: `:method
/// POST` and `:scheme http` from the static table, the rest literal
/// without indexing (RFC 7541).
fn health_check_headers() -> Vec<u8> {
    let mut h = vec![0x83, 0x86];
    let mut literal = |name_index: u8, value: &str| {
        h.push(name_index);
        h.push(value.len() as u8);
        h.extend_from_slice(value.as_bytes());
    };
    literal(0x04, "/grpc.health.v1.Health/Check"); // :path
    literal(0x01, "localhost"); // :authority
    h.extend_from_slice(&[0x0f, 0x10]); // content-type, static index 31
    h.push(16);
    h.extend_from_slice(b"application/grpc");
    h.extend_from_slice(&[0x00, 2]);
    h.extend_from_slice(b"te");
    h.push(8);
    h.extend_from_slice(b"trailers");
    h
}

/// A stampede's calls that give up while still queued in the connection
/// are cancelled before the daemon takes them up; h2 closes a connection
/// with more than 20 of those at once (GOAWAY ENHANCE_YOUR_CALM), failing
/// every call on it. The daemon allows 4,096 (`PENDING_RESETS` in
/// src/startup.rs): 500 calls sent and cancelled in one go leave the
/// connection open and answering.
#[tokio::test]
async fn calls_cancelled_before_they_are_taken_up_do_not_close_the_connection() {
    const CALLS: u32 = 500;
    let app = spawn_app_with(|_| {}).await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let headers = health_check_headers();
    let mut burst = OPENING.to_vec();
    for n in 0..CALLS {
        let stream = 2 * n + 1;
        burst.extend(frame(HEADERS, END_HEADERS, stream, &headers));
        burst.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    burst.extend(frame(PING, 0, 0, b"stillup?"));
    conn.write_all(&burst).await.unwrap();

    let mut goaway = None;
    let mut answered = false;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !answered {
            let mut header = [0u8; 9];
            conn.read_exact(&mut header).await?;
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await?;
            match header[3] {
                GOAWAY => goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
                PING if header[4] & ACK != 0 => answered = payload == b"stillup?",
                _ => {}
            }
        }
        std::io::Result::Ok(())
    })
    .await;
    assert_eq!(
        goaway, None,
        "GOAWAY with error code {goaway:?} (0xb: ENHANCE_YOUR_CALM)"
    );
    assert!(
        answered,
        "the connection answers its ping after the burst: {read:?}"
    );
    drop(conn);
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
    matches!(
        tokio::time::timeout(Duration::from_secs(5), get_sale(channel)).await,
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
