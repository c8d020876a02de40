//! Real processes for the fault suite: a Redis, a Postgres and a holdfast
//! daemon of its own, each on a free loopback port in a temporary folder,
//! with the daemon talking to Redis through an in-process TCP proxy that can
//! add delay and reset connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A free loopback port, below the ephemeral range (the bench's
/// `free_port` says why: Redis restarts on its port here).
pub fn free_port() -> u16 {
    holdfast::bench::free_port().expect("a free loopback port")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn signal(pid: u32, sig: &str) {
    run(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string()));
}

/// A Redis server with AOF and fsync on every write.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Redis {
    pub fn start(dir: &Path) -> Self {
        Self::start_with_env(dir, Vec::new())
    }

    /// A Redis whose process gets `env` (the clock test preloads a shim).
    pub fn start_with_env(dir: &Path, env: Vec<(String, String)>) -> Self {
        let mut r = Redis {
            port: free_port(),
            dir: dir.join("redis"),
            env,
            child: None,
        };
        std::fs::create_dir_all(&r.dir).unwrap();
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--save", "", "--maxmemory-policy", "noeviction", "--dir"])
            .arg(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (deploy/test.sh installs it)");
        self.child = Some(child);
        wait_port(self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9, then start again on the same port with its data.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// kill -9, lose everything, start empty.
    pub fn kill_and_restart_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).unwrap();
        std::fs::create_dir_all(&self.dir).unwrap();
        self.spawn();
    }

    /// A copy of Redis's data as it is now (its AOF, fsynced on every
    /// write), to start from again later ([`Redis::kill_and_restore`]).
    pub fn snapshot(&self) -> PathBuf {
        let copy = self.dir.with_file_name("redis-snapshot");
        let _ = std::fs::remove_dir_all(&copy);
        let out = Command::new("cp")
            .arg("-a")
            .arg(&self.dir)
            .arg(&copy)
            .output()
            .expect("cp runs");
        assert!(out.status.success(), "cp: {out:?}");
        copy
    }

    /// kill -9, then start again on the same port from `snapshot`: Redis
    /// restored with older data (a backup, an older AOF).
    pub fn kill_and_restore(&mut self, snapshot: &Path) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).unwrap();
        let out = Command::new("cp")
            .arg("-a")
            .arg(snapshot)
            .arg(&self.dir)
            .output()
            .expect("cp runs");
        assert!(out.status.success(), "cp: {out:?}");
        self.spawn();
    }

    pub fn freeze(&self) {
        signal(self.child.as_ref().unwrap().id(), "STOP");
    }

    pub fn thaw(&self) {
        signal(self.child.as_ref().unwrap().id(), "CONT");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .output();
        }
        self.kill();
    }
}

fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on port {port}");
}

fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgres is installed")
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs.last().unwrap().join("bin").join(name)
}

fn as_pg(args: &[&str]) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(args);
        c
    } else {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    }
}

/// A Postgres cluster of its own.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
}

impl Postgres {
    pub fn start(dir: &Path) -> Self {
        let p = Postgres {
            port: free_port(),
            dir: dir.join("pg"),
        };
        std::fs::create_dir_all(&p.dir).unwrap();
        let _ = Command::new("chown").arg("postgres").arg(&p.dir).output();
        let d = p.dir.to_str().unwrap();
        run(as_pg(&[
            pg_bin("initdb").to_str().unwrap(),
            "-D",
            d,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ])
        .stdout(Stdio::null()));
        p.pg_ctl_start();
        run(Command::new("psql").args([
            "-h",
            "127.0.0.1",
            "-p",
            &p.port.to_string(),
            "-U",
            "postgres",
            "-qc",
            "CREATE DATABASE holdfast",
        ]));
        p
    }

    fn pg_ctl_start(&self) {
        let d = self.dir.to_str().unwrap();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={d} -c fsync=off",
            self.port
        );
        let log = format!("{d}/log");
        run(as_pg(&[
            pg_bin("pg_ctl").to_str().unwrap(),
            "-D",
            d,
            "-l",
            &log,
            "-w",
            "-o",
            &opts,
            "start",
        ])
        .stdout(Stdio::null()));
    }

    pub fn stop(&self) {
        let d = self.dir.to_str().unwrap();
        run(as_pg(&[
            pg_bin("pg_ctl").to_str().unwrap(),
            "-D",
            d,
            "-m",
            "fast",
            "-w",
            "stop",
        ])
        .stdout(Stdio::null()));
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/holdfast", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap().to_owned();
        let _ = as_pg(&[
            pg_bin("pg_ctl").to_str().unwrap(),
            "-D",
            &d,
            "-m",
            "immediate",
            "-w",
            "stop",
        ])
        .output();
    }
}

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// Pass bytes through.
    Clean,
    /// Delay every chunk by this many ms, and reset every connection that
    /// carries traffic with one chance in `reset_one_in`.
    Bad { delay_ms: u64, reset_one_in: u64 },
    /// Delay every chunk by this many ms: a request reaches Redis, and is
    /// run, after its caller gave up on the answer.
    Slow { delay_ms: u64 },
}

/// A TCP proxy in front of Redis.
pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Net>,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, rx) = watch::channel(Net::Clean);
        let counter = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let rx = rx.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) =
                        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], target))).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        pump(cr, sw, rx.clone(), counter.clone()),
                        pump(sr, cw, rx, counter)
                    );
                });
            }
        });
        Proxy { port, mode }
    }

    pub fn set(&self, net: Net) {
        let _ = self.mode.send(net);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<Net>,
    counter: Arc<AtomicU64>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let net = *mode.borrow();
        if let Net::Slow { delay_ms } = net {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if let Net::Bad {
            delay_ms,
            reset_one_in,
        } = net
        {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            if counter
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(reset_one_in)
            {
                break;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A holdfast daemon process.
pub struct Daemon {
    pub grpc: u16,
    pub metrics: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(dir: &Path, redis_port: u16, database_url: &str) -> Self {
        Self::start_with_redis_timeout(dir, redis_port, database_url, Duration::from_millis(300))
    }

    /// A daemon that waits `timeout` for each Redis call (300 ms by
    /// [`Daemon::start`]): longer, a freeze holds its calls without
    /// opening the circuit.
    pub fn start_with_redis_timeout(
        dir: &Path,
        redis_port: u16,
        database_url: &str,
        timeout: Duration,
    ) -> Self {
        let grpc = free_port();
        let metrics = free_port();
        let args: Vec<String> = [
            "serve",
            "--dev",
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--redis-url",
            &format!("redis://127.0.0.1:{redis_port}"),
            "--database-url",
            database_url,
            "--redis-timeout-ms",
            &timeout.as_millis().to_string(),
            // Small grants of a fixed size, so that faults land between
            // grants often.
            "--grant-chunk",
            "20",
            "--grant-max-chunk",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut d = Daemon {
            grpc,
            metrics,
            args,
            log: dir.join("holdfast.log"),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_port(self.grpc);
    }

    /// kill -9, then start again.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// A gRPC channel to the daemon, connected.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The daemon's metrics page.
    pub async fn scrape(&self) -> String {
        use tokio::io::AsyncReadExt;
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.metrics)).await else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
