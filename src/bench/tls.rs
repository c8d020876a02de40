//! TLS for the load generator: driving a daemon that serves gRPC over TLS
//! (`--addr https://... --tls-ca`), and what TLS costs (`--probe tls`).
//!
//! The README tells anyone whose checkout calls holdfast from another
//! host to give it a certificate, so a user sizing machines asks what the
//! encryption costs a call. The probe answers it the way every figure
//! here is taken: side by side on the same machine, by turns. It makes a
//! CA and a certificate for 127.0.0.1 with `openssl` in the bench's
//! folder, then for [`TURNS`] turns starts the daemon plaintext and then
//! with `--tls-cert`/`--tls-key` on the same Redis and Postgres, and
//! drives each `--workload` (claim-hot when none is named) and the no-op
//! RPC through each for `--duration` at `--clients` over `--connections`.
//! Each run's line (`tls-run`) has its rate, latency and CPU per
//! operation; the closing line per workload (`tls`) sets the TLS rate and
//! p99 beside the plaintext ones, medians of the turns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::load::{Plan, Run};
use super::workloads::{self, Caller, Workload};
use super::{BenchArgs, Daemon, DaemonAuth, Probe, baselines, connections, conns, cpu, drained};

/// Plaintext and TLS runs of each workload, by turns: the machine's phase
/// moves both alike only when they alternate.
const TURNS: usize = 3;

/// A CA and, signed by it, a server certificate for `localhost` and
/// 127.0.0.1 and a client certificate (for mutual TLS), in PEM files of
/// one folder: `ca.pem`, `server.pem`/`server.key`,
/// `client.pem`/`client.key`.
#[derive(Debug, Clone)]
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes them with `openssl` (X.509 v3, which rustls requires; RSA
    /// 2048, valid two days) in `dir`, created if missing.
    pub fn make(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        let days = ["-days", "2"];
        openssl(
            dir,
            &[
                &["req", "-x509", "-newkey", "rsa:2048", "-nodes"],
                &["-keyout", "ca.key", "-out", "ca.pem"],
                &["-subj", "/CN=holdfast bench CA"],
                &days,
            ],
        )?;
        for (who, name) in [("server", "localhost"), ("client", "checkout")] {
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            let subj = format!("/CN={name}");
            openssl(
                dir,
                &[
                    &["req", "-newkey", "rsa:2048", "-nodes"],
                    &["-keyout", &key, "-out", &csr, "-subj", &subj],
                ],
            )?;
            let ext = format!("{who}.ext");
            openssl(
                dir,
                &[
                    &["x509", "-req", "-in", &csr, "-out", &pem],
                    &["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"],
                    &["-extfile", &ext],
                    &days,
                ],
            )?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// A file of the set: `ca.pem`, `server.pem`, `client.key`...
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Runs `openssl` in `dir` with the arguments, in groups for reading.
fn openssl(dir: &Path, args: &[&[&str]]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.concat();
    let out = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .context("running openssl, which makes the TLS probe's certificates")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The client's TLS: trusting the CA in the PEM file `ca` (the daemon's
/// certificate must name the host the client dials), and presenting
/// `identity` (certificate and key PEM files) to a daemon that requires
/// client certificates (`--tls-client-ca`).
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<ClientTlsConfig> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// The client TLS `--tls-ca`, `--tls-cert` and `--tls-key` ask for, or
/// none for a plaintext `--addr`. An `https://` address without a CA is
/// refused here, naming the flag, rather than at the first handshake.
pub fn from_args(args: &BenchArgs) -> anyhow::Result<Option<ClientTlsConfig>> {
    let https = args
        .addr
        .as_deref()
        .is_some_and(|a| a.starts_with("https://"));
    match (&args.tls_ca, https) {
        (None, false) => Ok(None),
        (None, true) => anyhow::bail!(
            "--addr {} is https: give --tls-ca, the CA (PEM) that signed the daemon's certificate",
            args.addr.as_deref().unwrap_or_default()
        ),
        (Some(_), false) => {
            anyhow::bail!("--tls-ca is for a daemon served over TLS: give --addr https://host:port")
        }
        (Some(ca), true) => {
            let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            client_tls(ca, identity).map(Some)
        }
    }
}

/// The probe needs daemons of its own, started plaintext and with TLS.
pub fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.addr.is_none(),
        "the tls probe starts daemons of its own, plaintext and with TLS; it cannot drive --addr"
    );
    Ok(())
}

/// One transport's run of one workload.
struct Measured {
    rps: f64,
    p99_ms: f64,
}

/// Runs the probe: a `tls-run` line per transport, turn and workload, then
/// a `tls` line per workload.
pub async fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    check(args)?;
    let certs = Certs::make(&dir.join("tls"))?;
    let client = client_tls(&certs.path("ca.pem"), None)?;
    let driven: Vec<Option<Workload>> = match args.workload.as_slice() {
        [] => vec![Some(Workload::ClaimHot)],
        named => named.iter().copied().map(Some).collect(),
    };
    // The no-op RPC (`None`) last: what TLS costs a call that does nothing.
    let driven: Vec<Option<Workload>> = driven.into_iter().chain([None]).collect();
    let plan = Plan {
        clients: args.clients,
        duration: Duration::from_secs(args.duration),
        rate: args.rate,
        max_calls: None,
    };
    let mut plain: Vec<Vec<Measured>> = driven.iter().map(|_| Vec::new()).collect();
    let mut tls: Vec<Vec<Measured>> = driven.iter().map(|_| Vec::new()).collect();
    for turn in 1..=TURNS {
        for secure in [false, true] {
            let daemon = Daemon::start(args, dir, DaemonAuth::Dev, secure.then_some(&certs))?;
            let transport = Transport {
                args,
                daemon: &daemon,
                client: secure.then_some(&client),
                plan: &plan,
            };
            let found = if secure { &mut tls } else { &mut plain };
            for (w, runs) in driven.iter().zip(found.iter_mut()) {
                runs.push(transport.measure(*w, turn).await?);
            }
        }
    }
    for ((w, plain), tls) in driven.iter().zip(&plain).zip(&tls) {
        let median = |runs: &[Measured], f: fn(&Measured) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (rps_plain, rps_tls) = (median(plain, |m| m.rps), median(tls, |m| m.rps));
        let (p99_plain, p99_tls) = (median(plain, |m| m.p99_ms), median(tls, |m| m.p99_ms));
        println!(
            "probe: tls workload={} turns={TURNS} rps_plain={rps_plain:.0} rps_tls={rps_tls:.0} ratio_rps={:.2} p99_plain_ms={p99_plain:.2} p99_tls_ms={p99_tls:.2} ratio_p99={:.2}",
            name(*w),
            rps_tls / rps_plain.max(f64::MIN_POSITIVE),
            p99_tls / p99_plain.max(f64::MIN_POSITIVE),
        );
    }
    if args.probe.contains(&Probe::Connections) {
        idle_connections(args, dir, &certs, &client, &plan).await?;
    }
    Ok(())
}

/// With the connections probe also asked for: the same measurement on a
/// daemon serving TLS (the bench's own daemon, plaintext, had it), for
/// what a TLS connection holds beyond a plaintext one (rustls's buffers
/// and session).
async fn idle_connections(
    args: &BenchArgs,
    dir: &Path,
    certs: &Certs,
    client: &ClientTlsConfig,
    plan: &Plan,
) -> anyhow::Result<()> {
    let daemon = Daemon::start(args, dir, DaemonAuth::Dev, Some(certs))?;
    let addr = daemon.addr();
    let channels = connections(&addr, Some(client), args.connections).await?;
    let caller = Caller::new(None);
    workloads::setup(Workload::ClaimHot, &channels[0], &caller).await?;
    let watched = cpu::Watched::find(Some(daemon.pid()), &args.redis_url, &args.database_url).await;
    let setup = conns::Setup {
        addr: &addr,
        tls: Some(client),
        daemon: daemon.pid(),
        watched: &watched,
        plan,
        idle: args.idle_connections,
    };
    conns::run(&channels, &caller, &setup).await
}

/// A workload's name in the probe's lines; the no-op RPC is `noop`.
fn name(w: Option<Workload>) -> &'static str {
    w.map_or("noop", Workload::name)
}

/// One started daemon and how the bench reaches it.
struct Transport<'a> {
    args: &'a BenchArgs,
    daemon: &'a Daemon,
    /// The client's TLS, for a daemon serving it.
    client: Option<&'a ClientTlsConfig>,
    plan: &'a Plan,
}

impl Transport<'_> {
    /// Sets `w` up on a sale of its own, warms it for a second, waits for
    /// the drainer, then measures it (the no-op RPC for `None`) and prints
    /// its line.
    async fn measure(&self, w: Option<Workload>, turn: usize) -> anyhow::Result<Measured> {
        let (args, plan) = (self.args, self.plan);
        let channels = connections(&self.daemon.addr(), self.client, args.connections).await?;
        let caller = Caller::new(None);
        let warm = Plan {
            duration: Duration::from_secs(1),
            ..plan.clone()
        };
        let go = |plan: &Plan| {
            let (channels, caller, plan) = (&channels, &caller, plan.clone());
            async move {
                match w {
                    Some(w) => workloads::run(w, channels, &plan, caller).await,
                    None => baselines::noop(channels, &plan, 1).await,
                }
            }
        };
        if let Some(w) = w {
            workloads::setup(w, &channels[0], &caller)
                .await
                .with_context(|| format!("setting up {}", w.name()))?;
        }
        go(&warm).await;
        self.settle().await;
        let watched =
            cpu::Watched::find(Some(self.daemon.pid()), &args.redis_url, &args.database_url).await;
        let before = watched.sample();
        let run: Run = go(plan).await;
        self.settle().await;
        let cpu = before.per_op(&watched.sample(), run.calls);
        println!(
            "probe: tls-run workload={} transport={} turn={turn} rps={:.0} p50_ms={:.2} p99_ms={:.2} errors={} cpu_us_per_op={cpu}",
            name(w),
            if self.client.is_some() {
                "tls"
            } else {
                "plain"
            },
            run.rate(),
            run.ms(0.5),
            run.ms(0.99),
            run.errors(),
        );
        Ok(Measured {
            rps: run.rate(),
            p99_ms: run.ms(0.99),
        })
    }

    /// Waits for the drainer to write the run's events, so that the next
    /// run does not share the machine with this one's write-back.
    async fn settle(&self) {
        let Ok(client) = redis::Client::open(self.args.redis_url.as_str()) else {
            return;
        };
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            return;
        };
        drained::settle_dev(&mut con).await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::from_args;
    use crate::config::{Cli, Command};

    fn bench(args: &[&str]) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        let cli = Cli::try_parse_from([&["holdfast", "bench"], args].concat())?;
        let Command::Bench(args) = cli.command else {
            unreachable!("parsed a bench command")
        };
        from_args(&args)
    }

    #[test]
    fn an_https_daemon_needs_the_ca_that_signed_its_certificate() {
        let err = bench(&["--addr", "https://shop:50051"]).unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let err = bench(&["--tls-ca", "/nowhere/ca.pem"]).unwrap_err();
        assert!(err.to_string().contains("--addr https://"), "{err}");
        let err = bench(&[
            "--addr",
            "https://shop:50051",
            "--tls-ca",
            "/nowhere/ca.pem",
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nowhere/ca.pem"), "{err:#}");
        // A client certificate needs its key and a CA; clap says so.
        assert!(bench(&["--tls-cert", "c.pem", "--tls-ca", "ca.pem"]).is_err());
        assert!(bench(&["--addr", "http://shop:50051"]).unwrap().is_none());
        assert!(bench(&[]).unwrap().is_none());
    }
}
