//! A stampede while Redis is down, as `holdfast bench --probe
//! stampede,fallback` drives it (the binary, as a user runs it): the
//! probe freezes the Redis it is given, so it runs here, on a Redis and a
//! Postgres of its own, and not in the API suite, whose Redis every test
//! shares. A crowd claims a sale through the Redis path and then, with
//! Redis frozen, another through the Postgres fallback; with a deadline
//! no call comes near, every claim is answered, and each sale counts
//! exactly the units its callers were told they claimed.

use crate::TempDir;
use crate::cluster::{Postgres, Redis};

#[tokio::test]
async fn a_stampede_through_the_fallback_sells_what_its_callers_were_told() {
    let tmp = TempDir::new("stampede");
    let redis = Redis::start(&tmp.0);
    let pg = Postgres::start(&tmp.0);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("bench")
        .args(["--probe", "stampede,fallback", "--crowds", "16"])
        .args(["--deadline-ms", "5000", "--duration", "2", "--no-baselines"])
        .args(["--redis-url", &format!("redis://127.0.0.1:{}", redis.port)])
        .args(["--database-url", &pg.url()])
        .env_remove("HOLDFAST_BENCH_ADDR")
        .env_remove("HOLDFAST_BENCH_API_KEY")
        .output()
        .await
        .expect("the bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for name in ["stampede", "stampede-fallback"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("probe: {name} crowd=16 ")))
            .unwrap_or_else(|| panic!("a {name} line: {stdout}"));
        let field = |f: &str| -> String {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{f} in {line}"))
                .to_owned()
        };
        let claimed: u64 = field("claimed").parse().unwrap();
        assert!(claimed > 0, "{line}");
        assert_eq!(field("other_errors"), "0", "{line}");
        assert_eq!(field("given_up_per_s"), "0", "{line}");
        // Sold beyond what was answered: none, with no call given up.
        assert_eq!(field("unanswered"), "0", "{line}");
    }
}
