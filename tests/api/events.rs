//! EventService.Watch: live events, resumable with no gap and no
//! duplicate.

use holdfast::grpc::pb::{self, Outcome};
use tokio_stream::StreamExt;

use redis::AsyncCommands;

use holdfast::domain::TenantId;
use holdfast::store::HoldReply;
use holdfast::store::postgres::{PgStore, product_pool};

use crate::fallback::take;
use crate::helpers::{TestApp, claim, spawn_app, spawn_app_with};

/// A Watch of the tenant's events after `after_event_id` ("" for from now).
pub(crate) async fn watch(
    app: &TestApp,
    after_event_id: String,
) -> tonic::Streaming<pb::WatchResponse> {
    app.events()
        .watch(pb::WatchRequest { after_event_id })
        .await
        .unwrap()
        .into_inner()
}

/// `n` claims of one unit each, `c{from}` on, on sale "w", one at a time.
pub(crate) async fn claims(app: &TestApp, from: usize, n: usize) {
    for i in from..from + n {
        let r = app
            .flash()
            .claim(claim(&format!("c{i}"), "w", &[("p", 1)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outcome(), Outcome::Ok);
    }
}

/// The next event on `stream`, within 10 s.
pub(crate) async fn next(stream: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
        .expect("an event, not an error")
}

#[tokio::test]
async fn a_subscriber_that_resumes_from_its_last_id_sees_every_event_exactly_once() {
    let app = spawn_app().await;
    app.live_sale("w", &[("p", Some(100))], 0).await;
    let mut stream = watch(&app, String::new()).await;
    claims(&app, 0, 5).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut stream).await);
    }
    let last = seen.last().unwrap().event_id.clone();
    drop(stream);

    // While disconnected, more happens.
    claims(&app, 5, 3).await;
    let mut resumed = watch(&app, last).await;
    for _ in 0..5 {
        seen.push(next(&mut resumed).await);
    }
    let ids: Vec<&str> = seen.iter().map(|e| e.hold_id.as_str()).collect();
    assert_eq!(ids, vec!["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"]);
    assert!(seen.iter().all(|e| e.kind == "claimed" && e.job == "flash"));
    assert_eq!(seen[0].lines[0].pool_id, "sale/w/p");
    app.shutdown().await;
}

/// The history also skips the fallback's own audit rows (not in Watch;
/// their ids are not stream ids).
#[tokio::test]
async fn history_older_than_the_redis_stream_comes_from_postgres() {
    // Grants of one unit leave the fallback units to sell.
    let app = spawn_app_with(|a| {
        a.grant_chunk = 1;
        a.grant_max_chunk = 1;
    })
    .await;
    app.live_sale("h", &[("p", Some(100))], 0).await;
    for i in 0..4 {
        app.flash()
            .claim(claim(&format!("c{i}"), "h", &[("p", 1)]))
            .await
            .unwrap();
    }
    app.eventually("four events in postgres", || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (n == 4).then_some(())
    })
    .await;
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let sold = pg
        .fallback_takes(
            &dev,
            &[take("by-fallback", &[(&product_pool("h", "p"), 1)], None)],
        )
        .await
        .unwrap();
    assert!(matches!(sold[0], Ok(HoldReply::Hold(_))), "{sold:?}");
    let (first,): (String,) = sqlx::query_as("SELECT event_id FROM audit_log ORDER BY id LIMIT 1")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    // Simulate retention: drop the stream's oldest entries (all drained).
    let mut con = app.redis().await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let _: i64 = redis::cmd("XTRIM")
        .arg(&key)
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut con)
        .await
        .unwrap();

    let mut stream = watch(&app, first).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(next(&mut stream).await.hold_id);
    }
    app.flash()
        .claim(claim("c4", "h", &[("p", 1)]))
        .await
        .unwrap();
    ids.push(next(&mut stream).await.hold_id);
    assert_eq!(ids, vec!["c1", "c2", "c3", "c4"]);
    app.shutdown().await;
}

/// With no keep, the drainer trims what it has written to Postgres (whole
/// stream nodes of 100 entries at a time), and a Watch from the oldest id
/// still sees every event, in order, from the audit log first.
#[tokio::test]
async fn drained_events_leave_redis_and_a_watch_from_the_start_still_sees_them() {
    const CLAIMS: usize = 300;
    let app = spawn_app_with(|a| a.event_keep_secs = 0).await;
    app.live_sale("k", &[("p", Some(1_000))], 0).await;
    for i in 0..CLAIMS {
        app.flash()
            .claim(claim(&format!("c{i}"), "k", &[("p", 1)]))
            .await
            .unwrap();
    }
    let con = app.redis().await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    app.eventually("drained events trimmed from the stream", || {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            let len: usize = con.xlen(&key).await.unwrap();
            (len < CLAIMS).then_some(())
        }
    })
    .await;
    let (first,): (String,) = sqlx::query_as("SELECT event_id FROM audit_log ORDER BY id LIMIT 1")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let mut stream = watch(&app, first).await;
    for i in 1..CLAIMS {
        assert_eq!(next(&mut stream).await.hold_id, format!("c{i}"));
    }
    app.shutdown().await;
}

/// Events an earlier daemon wrote to Postgres and left in the stream past
/// the keep are trimmed by the next daemon once it starts, with no traffic
/// of its own: each stream is tended once when the drainer first makes (or
/// finds) its group, where a stream with no new events is never tended
/// again.
#[tokio::test]
async fn events_an_earlier_daemon_left_are_trimmed_by_the_next_one() {
    const LEFT: usize = 300;
    let prefix = format!("t{}", crate::helpers::random_suffix());
    let key = format!("{prefix}:{{dev}}:events");
    let client = redis::Client::open(crate::helpers::redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    // What the earlier daemon left: entries its group read and
    // acknowledged (the group's last delivered id is the newest, nothing
    // pending), all past a keep of zero.
    let mut left = redis::pipe();
    for ms in 1..=LEFT {
        left.cmd("XADD")
            .arg(&key)
            .arg(format!("{ms}-0"))
            .arg("k")
            .arg("claimed")
            .ignore();
    }
    left.cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(holdfast::jobs::drainer::GROUP)
        .arg("$")
        .ignore();
    let () = left.query_async(&mut con).await.unwrap();
    let app = spawn_app_with(|a| {
        a.redis_prefix = prefix.clone();
        a.event_keep_secs = 0;
    })
    .await;
    app.eventually("what the earlier daemon left trimmed", || {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            let len: usize = con.xlen(&key).await.unwrap();
            (len < LEFT).then_some(())
        }
    })
    .await;
    app.shutdown().await;
}

/// The trim never drops an event some drainer has read but not written to
/// Postgres: here a "stalled" consumer of the drainers' group holds one
/// entry pending while 600 claims go through and are trimmed around it.
#[tokio::test]
async fn the_trim_keeps_an_event_that_a_stalled_drainer_has_not_written() {
    let app = spawn_app_with(|a| a.event_keep_secs = 0).await;
    app.live_sale("k", &[("p", Some(1_000))], 0).await;
    let claims = |from: usize| {
        let app = &app;
        async move {
            for i in from..from + 300 {
                app.flash()
                    .claim(claim(&format!("c{i}"), "k", &[("p", 1)]))
                    .await
                    .unwrap();
            }
        }
    };
    let mut con = app.redis().await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let drained = || {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            let groups: redis::streams::StreamInfoGroupsReply =
                con.xinfo_groups(&key).await.unwrap();
            groups
                .groups
                .iter()
                .any(|g| g.pending == 0 && g.lag == Some(0))
                .then_some(())
        }
    };
    claims(0).await;
    app.eventually("every event drained", drained).await;
    // One more entry, delivered at once to a consumer that never writes it.
    let stalled: String = redis::Script::new(
        r"local id = redis.call('XADD', KEYS[1], '*', 'k', 'claimed', 'h', 'stalled')
          redis.call('XREADGROUP', 'GROUP', 'drainer', 'stalled', 'COUNT', 1, 'STREAMS', KEYS[1], '>')
          return id",
    )
    .key(&key)
    .invoke_async(&mut con)
    .await
    .unwrap();
    claims(300).await;
    app.eventually("the events around it trimmed", || {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            let len: usize = con.xlen(&key).await.unwrap();
            (len < 601).then_some(())
        }
    })
    .await;
    let kept: redis::streams::StreamRangeReply =
        con.xrange(&key, &stalled, &stalled).await.unwrap();
    assert_eq!(
        kept.ids.len(),
        1,
        "the pending entry {stalled} is still there"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_malformed_resume_id_is_invalid_argument() {
    let app = spawn_app().await;
    let err = app
        .events()
        .watch(pb::WatchRequest {
            after_event_id: "yesterday".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("after_event_id"));
    app.shutdown().await;
}

/// The drainer inserts a batch's audit rows taken to be new, and when one
/// was recorded before (a batch read again after a crash between the
/// commit and the acknowledgement) it records the others, and only their
/// sold units, once.
#[tokio::test]
async fn a_batch_recorded_in_part_before_records_only_the_rest() {
    use holdfast::domain::TenantId;
    use holdfast::store::postgres::PgStore;
    use holdfast::store::redis::decode_event;

    let app = spawn_app().await;
    app.live_sale("r", &[("p", Some(100))], 0).await;
    for i in 0..3 {
        app.flash()
            .claim(claim(&format!("c{i}"), "r", &[("p", 2)]))
            .await
            .unwrap();
    }
    app.eventually("the claims written back", || async {
        (app.pg_sold("r", "p").await == 6).then_some(())
    })
    .await;
    let mut con = app.redis().await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let entries: redis::streams::StreamRangeReply = con.xrange_all(&key).await.unwrap();
    let mut events: Vec<_> = entries
        .ids
        .iter()
        .map(|e| decode_event(e).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    // One the drainer never read: a copy of the last under a later id.
    let mut unseen = events[2].clone();
    unseen.event_id = format!("{}9", events[2].event_id);
    unseen.hold_id = "c3".into();
    events.push(unseen);
    let audited = app.audit_count().await;

    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    assert_eq!(pg.record_events(&dev, &events).await.unwrap().0, 1);
    assert_eq!(app.audit_count().await, audited + 1);
    assert_eq!(app.pg_sold("r", "p").await, 8, "only the new claim's units");
    assert_eq!(pg.record_events(&dev, &events).await.unwrap().0, 0);
    assert_eq!(app.audit_count().await, audited + 1);
    assert_eq!(app.pg_sold("r", "p").await, 8);
    app.shutdown().await;
}

/// The drainer reads every round only the streams of tenants its daemon
/// sent operations for and of those with recent events, and every stream
/// once a second (src/jobs/drainer.rs): an event another daemon appended
/// to a quiet tenant's stream still reaches Postgres.
#[tokio::test]
async fn an_event_another_daemon_appended_to_a_quiet_stream_is_drained() {
    use holdfast::domain::{HoldId, Job, Line, Lines, Quantity, TenantId};
    let app = spawn_app().await;
    app.live_sale("q", &[("p", Some(10))], 0).await;
    // Quiet for longer than a stream stays lively after its last events.
    let quiet = holdfast::jobs::drainer::LIVELY + std::time::Duration::from_millis(500);
    tokio::time::sleep(quiet).await;
    // Another daemon's store (its own coalescer) claims.
    let other = app.redis_store().await;
    let lines = vec![Line {
        pool: holdfast::store::postgres::product_pool("q", "p"),
        quantity: Quantity::parse("quantity", 1, 10).unwrap(),
    }];
    let reply = other
        .claim(
            &TenantId::parse("dev").unwrap(),
            &HoldId::parse("claim_id", "elsewhere", 128).unwrap(),
            Job::Flash,
            &Lines::parse("lines", lines, 10).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert!(
        matches!(reply, holdfast::store::HoldReply::Hold(_)),
        "{reply:?}"
    );
    app.eventually("the claim in the audit log", async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM audit_log WHERE hold_id = 'elsewhere' AND kind = 'claimed'",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap()
        .eq(&1)
        .then_some(())
    })
    .await;
    app.shutdown().await;
}

/// An event a daemon read and never acknowledged (it stopped mid-batch)
/// reaches Postgres though no daemon restarts: the drainers share their
/// consumer name, and read again what it left pending.
#[tokio::test]
async fn an_event_a_stopped_drainer_left_pending_is_written() {
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(10))], 0).await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let consumer = format!("holdfast-{}", app.redis_prefix);
    // Appended and delivered to the drainers' name in one step, so that
    // the running drainer never gets it as new: a batch another daemon
    // read before it stopped.
    let mut con = app.redis().await;
    let now = chrono::Utc::now().timestamp_millis().to_string();
    let (_, _): (String, redis::Value) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg(&[
            "k",
            "extended",
            "j",
            "stock",
            "h",
            "left-pending",
            "l",
            "[]",
            "t",
        ])
        .arg(&now)
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(holdfast::jobs::drainer::GROUP)
        .arg(&consumer)
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    app.eventually_within(
        std::time::Duration::from_secs(30),
        "the pending event in the audit log",
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE hold_id = 'left-pending'")
                    .fetch_one(&app.pg)
                    .await
                    .unwrap();
            (n == 1).then_some(())
        },
    )
    .await;
    app.shutdown().await;
}

/// Entries trimmed from the stream between two of a subscriber's reads
/// (written to Postgres, as the trim requires) come from Postgres, in
/// order, before the entries after them: none is skipped.
#[tokio::test]
async fn entries_trimmed_between_two_reads_come_from_postgres() {
    let app = spawn_app().await;
    let mut stream = watch(&app, String::new()).await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let ms = chrono::Utc::now().timestamp_millis() + 60_000;
    let id = |n: u32| format!("{ms}-{n}");
    // g1..g3 as the drainer would have written them.
    for n in 1..=3 {
        sqlx::query(
            "INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, at)
             VALUES ('dev', $1, 'extended', 'stock', $2, '[]', now())",
        )
        .bind(id(n))
        .bind(format!("g{n}"))
        .execute(&app.pg)
        .await
        .unwrap();
    }
    // g1..g5 appended, and g1..g3 trimmed, in one step: the subscriber's
    // next read finds the stream starting at g4.
    let mut add = redis::pipe();
    add.atomic();
    for n in 1..=5 {
        add.cmd("XADD")
            .arg(&key)
            .arg(id(n))
            .arg(&["k", "extended", "j", "stock", "l", "[]", "t"])
            .arg(ms)
            .arg("h")
            .arg(format!("g{n}"))
            .ignore();
    }
    add.cmd("XTRIM").arg(&key).arg("MINID").arg(id(4)).ignore();
    let () = add.query_async(&mut app.redis().await).await.unwrap();

    let mut seen = Vec::new();
    for _ in 1..=5 {
        seen.push(next(&mut stream).await.hold_id);
    }
    assert_eq!(seen, ["g1", "g2", "g3", "g4", "g5"]);
    app.shutdown().await;
}

/// History pages read a range of the event-id index (ids sort as text by
/// their milliseconds) but come out in stream order: sequence numbers of
/// one millisecond by number ("-10" after "-9"), across a carry of the
/// milliseconds' digits, without the fallback's rows, bounded by `before`,
/// and a page at a time with no gap and no repeat.
#[tokio::test]
async fn history_pages_come_in_stream_order_from_a_range_of_the_index() {
    let app = spawn_app().await;
    let a: u64 = 1_700_000_000_009; // a + 1 carries into the tens
    let mut ids: Vec<(u64, u64)> = (0..13).map(|s| (a, s)).collect();
    ids.extend([(a + 1, 0), (a + 1, 1), (a + 2, 0), (a + 11, 3)]);
    let mut rows: Vec<String> = ids.iter().map(|(m, s)| format!("{m}-{s}")).collect();
    rows.extend(["f1".to_string(), "f2".to_string()]);
    rows.reverse(); // inserted out of order: the row id says nothing
    for id in &rows {
        sqlx::query(
            "INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, at)
             VALUES ('dev', $1, 'extended', 'stock', $1, '[]', now())",
        )
        .bind(id)
        .execute(&app.pg)
        .await
        .unwrap();
    }
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let page = |after: (u64, u64), before: Option<(u64, u64)>, limit: i64| {
        let (pg, dev) = (&pg, &dev);
        async move {
            let events = pg.events_between(dev, after, before, limit).await.unwrap();
            events.into_iter().map(|e| e.event_id).collect::<Vec<_>>()
        }
    };
    let in_order = |from: usize, to: usize| -> Vec<String> {
        ids[from..to]
            .iter()
            .map(|(m, s)| format!("{m}-{s}"))
            .collect()
    };

    assert_eq!(page((a, 1), None, 3).await, in_order(2, 5));
    assert_eq!(page((a, 8), None, 4).await, in_order(9, 13));
    assert_eq!(page((a, 12), None, 2).await, in_order(13, 15));
    assert_eq!(page((a + 1, 1), None, 10).await, in_order(15, 17));
    assert_eq!(page((a, 5), Some((a + 1, 1)), 100).await, in_order(6, 14));

    // Paged through with every page size, as the replay pages: each id
    // once, in order.
    for limit in 1..=6 {
        let (mut after, mut seen) = ((0, 0), Vec::new());
        loop {
            let got = page(after, None, limit).await;
            let Some(last) = got.last() else { break };
            let (m, s) = last.split_once('-').unwrap();
            after = (m.parse().unwrap(), s.parse().unwrap());
            seen.extend(got);
        }
        assert_eq!(seen, in_order(0, ids.len()), "pages of {limit}");
    }
    app.shutdown().await;
}

/// The bench's watch-replay probe: 700 claims (two pages of history)
/// trimmed from the stream come to a resuming subscriber from Postgres,
/// each once and in stream order.
#[tokio::test]
async fn the_watch_replay_probe_gets_every_trimmed_event_from_postgres_in_order() {
    use holdfast::bench::{Caller, watch_replay};
    let app = spawn_app().await;
    let stream = format!("{}:{{dev}}:events", app.redis_prefix);
    let url = crate::helpers::redis_url();
    let caller = Caller::new(None);
    let replay = watch_replay(
        &[app.channel()],
        &caller,
        &app.database_url,
        &url,
        &stream,
        8,
        700,
    )
    .await
    .expect("the probe runs");
    assert_eq!((replay.events, replay.in_order), (700, true), "{replay:?}");
    let len: i64 = app.redis().await.xlen(&stream).await.unwrap();
    assert_eq!(
        len, 0,
        "the run's events were trimmed, so they came from Postgres"
    );
    assert!(replay.line().contains("events=700"), "{}", replay.line());
    app.shutdown().await;
}
