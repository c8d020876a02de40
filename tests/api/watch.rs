//! Live `Watch` subscribers of one tenant share one reader of its stream
//! (a tap): each still gets every event after its own start exactly once
//! and in order, whenever it joined; one that falls behind, or is cut by a
//! shutdown, is told where to resume; and "from now" means now, also on a
//! stream the trim emptied.

use std::time::Duration;

use holdfast::grpc::pb::{self, Outcome};
use redis::AsyncCommands;
use tokio_stream::StreamExt;

use crate::events::{claims, next, watch};
use crate::helpers::{
    STORE_A_ADMIN, STORE_A_CHECKOUT, STORE_B_ADMIN, TestApp, claim, live_sale_request, redis_url,
    spawn_app, spawn_two_stores, with_key,
};
use crate::ops::{samples, scrape, value};

/// The hold ids of the next `n` events on `stream`.
async fn ids(stream: &mut tonic::Streaming<pb::WatchResponse>, n: usize) -> Vec<String> {
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        seen.push(next(stream).await.hold_id);
    }
    seen
}

fn expected(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("c{i}")).collect()
}

/// `CLIENT LIST`'s lines of the daemon's Redis connections named `what`:
/// `watch` for the readers of its taps (`watch:<prefix>`), `watch-gap`
/// for a subscriber of the dev tenant reading a gap (`watch-gap:<the
/// tenant's stream>`).
async fn listed(app: &TestApp, what: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let name = match what {
        "watch" => format!("name=watch:{} ", app.redis_prefix),
        _ => format!("name={what}:{}:{{dev}}:events ", app.redis_prefix),
    };
    list.lines()
        .filter(|l| l.contains(&name))
        .map(str::to_owned)
        .collect()
}

/// The value of the field called `name` in a `CLIENT LIST` line.
fn field(line: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    line.split(' ')
        .find_map(|f| f.strip_prefix(prefix.as_str()))
        .unwrap_or_default()
        .to_owned()
}

/// Claims `c0`..`c{n-1}` on a live sale "w", waits until they are in
/// Postgres, then trims the tenant's stream empty, as the drainer does a
/// quiet tenant's a minute later. The stream's key, and a connection.
async fn trimmed_empty(app: &TestApp, n: usize) -> (String, redis::aio::MultiplexedConnection) {
    app.live_sale("w", &[("p", Some(1_000))], 0).await;
    claims(app, 0, n).await;
    app.eventually("the claims are in Postgres", || async {
        (app.audit_count().await >= n as i64).then_some(())
    })
    .await;
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let mut con = app.redis().await;
    let _: i64 = con
        .xtrim(&key, redis::streams::StreamMaxlen::Equals(0))
        .await
        .unwrap();
    (key, con)
}

/// Redis connections named as the daemon's taps' readers.
async fn taps(app: &TestApp) -> usize {
    listed(app, "watch").await.len()
}

/// Waits until the daemon has one reader, waiting in its blocking read.
async fn blocked_reader(app: &TestApp) {
    app.eventually("the reader waiting in its read", || async {
        let listed = listed(app, "watch").await;
        (listed.len() == 1
            && field(&listed[0], "cmd") == "xread"
            && field(&listed[0], "flags").contains('b'))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn subscribers_share_one_reader_and_each_gets_its_events_once_in_order() {
    let app = spawn_app().await;
    app.live_sale("w", &[("p", Some(1_000))], 0).await;
    claims(&app, 0, 5).await;
    let mut early: Vec<_> = Vec::new();
    for _ in 0..3 {
        early.push(watch(&app, String::new()).await);
    }
    claims(&app, 5, 20).await;
    let first_five = ids(&mut early[0], 5).await;
    // One joins from now, mid-sale; one resumes from an id before every
    // subscriber's start, which the tap never read.
    let mut late = watch(&app, String::new()).await;
    let old = app
        .eventually("c1's event in Postgres", || async {
            sqlx::query_scalar::<_, String>("SELECT event_id FROM audit_log WHERE hold_id = 'c1'")
                .fetch_optional(&app.pg)
                .await
                .unwrap()
        })
        .await;
    let mut from_old = watch(&app, old).await;
    claims(&app, 25, 10).await;

    assert_eq!(first_five, expected(5, 10));
    assert_eq!(ids(&mut early[0], 25).await, expected(10, 35));
    for stream in &mut early[1..] {
        assert_eq!(ids(stream, 30).await, expected(5, 35));
    }
    assert_eq!(ids(&mut late, 10).await, expected(25, 35));
    assert_eq!(ids(&mut from_old, 33).await, expected(2, 35));
    assert_eq!(taps(&app).await, 1, "five subscribers, one reader");
    app.eventually("the gaps' connections let go once read", || async {
        listed(&app, "watch-gap").await.is_empty().then_some(())
    })
    .await;
    for stream in early.iter_mut().chain([&mut late, &mut from_old]) {
        let more = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(more.is_err(), "no event twice: {more:?}");
    }
    app.shutdown().await;
}

/// A tap with nothing to read waits in one blocking read instead of
/// asking Redis again and again (a platform's ten thousand quiet shops
/// with a subscriber each would be ten thousand taps asking), still hands
/// on what comes, and ends as soon as its last subscriber leaves.
#[tokio::test]
async fn a_quiet_tap_waits_in_one_read_and_ends_when_its_last_subscriber_leaves() {
    let app = spawn_app().await;
    app.live_sale("w", &[("p", Some(10))], 0).await;
    let mut stream = watch(&app, String::new()).await;
    let other = watch(&app, String::new()).await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let listed = listed(&app, "watch").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(field(&listed[0], "cmd"), "xread", "{listed:?}");
    assert!(
        field(&listed[0], "flags").contains('b'),
        "blocked: {listed:?}"
    );
    let idle: u64 = field(&listed[0], "idle").parse().unwrap();
    assert!(idle >= 3, "one read for 3.5 s: {listed:?}");

    drop(other);
    claims(&app, 0, 1).await;
    assert_eq!(next(&mut stream).await.hold_id, "c0");
    assert_eq!(taps(&app).await, 1, "one subscriber left, the tap stays");
    drop(stream);
    // Well inside one blocking read (10 s).
    app.eventually_within(
        Duration::from_secs(2),
        "the tap's connection closed",
        || async { (taps(&app).await == 0).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

/// Two shops' taps share one reader, one Redis connection, so that the
/// shops a daemon watches at once are not bounded by Redis's clients:
/// each shop's subscriber still gets its own shop's events and none of
/// the other's, and a shop that subscribes while the reader waits in its
/// blocking read is read at once, not when the read's ten seconds run
/// out.
#[tokio::test]
async fn shops_share_a_reader_and_each_gets_only_its_own_events() {
    let app = spawn_two_stores().await;
    for store in [STORE_A_ADMIN, STORE_B_ADMIN] {
        let sale = live_sale_request("spring", &[("p", Some(100))]);
        app.flash()
            .create_sale(with_key(sale, store))
            .await
            .unwrap();
    }
    let watch_as = |key: &'static str| {
        let mut events = app.events();
        async move {
            let req = pb::WatchRequest::default();
            events.watch(with_key(req, key)).await.unwrap().into_inner()
        }
    };
    let sell = |id: &'static str, key: &'static str| {
        let mut flash = app.flash();
        async move {
            let r = flash.claim(with_key(claim(id, "spring", &[("p", 1)]), key));
            assert_eq!(r.await.unwrap().get_ref().outcome(), Outcome::Ok);
        }
    };
    let mut a = watch_as(STORE_A_CHECKOUT).await;
    blocked_reader(&app).await;
    let mut b = watch_as(STORE_B_ADMIN).await;
    sell("b0", STORE_B_ADMIN).await;
    let first = tokio::time::timeout(Duration::from_secs(5), b.next()).await;
    let first = first.expect("B's event well before the reader's read ran out");
    assert_eq!(first.unwrap().unwrap().hold_id, "b0");
    sell("a0", STORE_A_CHECKOUT).await;
    sell("b1", STORE_B_ADMIN).await;
    assert_eq!(next(&mut a).await.hold_id, "a0", "B's b0 is not A's");
    assert_eq!(next(&mut b).await.hold_id, "b1");
    assert_eq!(taps(&app).await, 1, "two shops, one reader");
    for stream in [&mut a, &mut b] {
        let more = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(more.is_err(), "no other shop's event, none twice: {more:?}");
    }
    drop(a);
    blocked_reader(&app).await;
    sell("b2", STORE_B_ADMIN).await;
    assert_eq!(next(&mut b).await.hold_id, "b2", "B's tap outlives A's");
    app.shutdown().await;
}

/// `EventService` is served by a server of its own (each event encoded
/// once for all subscribers): a method it does not have is UNIMPLEMENTED,
/// as any other service's is, and a malformed request is refused as
/// INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn the_event_service_answers_what_it_does_not_serve_as_grpc_does() {
    let app = spawn_app().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/holdfast.v1.EventService/Unwatch");
    let codec = tonic_prost::ProstCodec::<pb::WatchRequest, pb::WatchResponse>::default();
    let status = grpc
        .unary(
            tonic::Request::new(pb::WatchRequest::default()),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status}");

    let status = app
        .events()
        .watch(pb::WatchRequest {
            after_event_id: "yesterday".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("after_event_id"), "{status}");
    app.shutdown().await;
}

/// A quiet tenant's stream is trimmed empty once its events are in
/// Postgres; a subscriber from now then starts at the stream's clock, not
/// at its beginning, and gets no history. The same when Redis lost the
/// stream altogether. One resuming from an id meanwhile gets what followed
/// it from Postgres at once, then the new events.
#[tokio::test]
async fn from_now_on_a_stream_the_trim_emptied_sends_no_history() {
    let app = spawn_app().await;
    let (key, mut con) = trimmed_empty(&app, 3).await;
    let mut stream = watch(&app, String::new()).await;
    let c0: String = sqlx::query_scalar("SELECT event_id FROM audit_log WHERE hold_id = 'c0'")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let mut resumed = watch(&app, c0).await;
    // Before any new event, which would also show it the gap.
    assert_eq!(ids(&mut resumed, 2).await, expected(1, 3));
    claims(&app, 3, 1).await;
    assert_eq!(next(&mut stream).await.hold_id, "c3");
    assert_eq!(next(&mut resumed).await.hold_id, "c3");

    let _: i64 = con.del(&key).await.unwrap();
    let mut stream = watch(&app, String::new()).await;
    claims(&app, 4, 1).await;
    assert_eq!(next(&mut stream).await.hold_id, "c4");
    app.shutdown().await;
}

/// The first event on a quiet tenant's stream, which the trim emptied, is
/// past every subscriber's cursor with nothing lost between (Postgres has
/// all before it): the subscriber takes it from its tap without opening a
/// Redis connection to read a gap. Seen in Redis's MONITOR, up to a marker
/// sent once the event has arrived.
#[tokio::test]
async fn the_first_event_on_a_trimmed_stream_opens_no_gap_connection() {
    let app = spawn_app().await;
    let (_, mut con) = trimmed_empty(&app, 1).await;
    let mut stream = watch(&app, String::new()).await;
    let mut monitor = redis::Client::open(redis_url())
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let mut seen = monitor.on_message::<String>();
    claims(&app, 1, 1).await;
    assert_eq!(next(&mut stream).await.hold_id, "c1");
    let marker = format!("marker-{}", app.redis_prefix);
    let _: String = redis::cmd("ECHO")
        .arg(&marker)
        .query_async(&mut con)
        .await
        .unwrap();
    let gap = format!("watch-gap:{}", app.redis_prefix);
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), seen.next())
            .await
            .expect("the marker within 10 s")
            .expect("MONITOR goes on");
        assert!(!line.contains(&gap), "a gap's connection: {line}");
        if line.contains(&marker) {
            break;
        }
    }
    app.shutdown().await;
}

/// A subscriber that stops reading is ended once its buffer is full, with
/// ABORTED naming the last event it was sent, from which it resumes with
/// nothing lost; the metrics count it live, then ended as fell_behind. The events are appended to the stream directly, as fast
/// as Redis takes them, and the subscriber's connection has HTTP/2's
/// smallest window, so that little waits in transit.
#[tokio::test]
async fn a_subscriber_that_falls_behind_is_told_where_to_resume() {
    const EVENTS: usize = 20_000;
    let app = spawn_app().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut stream = pb::event_service_client::EventServiceClient::new(channel)
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let before = samples(&scrape(&app).await);
    assert!(value(&before, "holdfast_watch_subscribers", &[]) >= 1.0);
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let mut add = redis::pipe();
    for n in 0..EVENTS {
        add.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg(&["k", "extended", "j", "stock", "l", "[]", "t", "0", "h"])
            .arg(format!("g{n}"))
            .ignore();
    }
    // One pipeline, given longer than a connection's default half second
    // to answer: on a busy machine 20,000 appends take more.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let mut con = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let () = add.query_async(&mut con).await.unwrap();
    // Not reading meanwhile: the daemon has a few thousand events to push
    // before the window, its send buffer and the subscriber's buffer are
    // full, a few milliseconds' work. Read at once, the test's client can
    // keep up, and then nothing falls behind.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut got = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(event))) => got.push(event),
            Ok(Some(Err(status))) => break status,
            other => panic!(
                "ended without a status after {} events: {other:?}",
                got.len()
            ),
        }
    };
    assert_eq!(status.code(), tonic::Code::Aborted, "{status}");
    let last = got.last().expect("some events came first");
    assert!(
        status
            .message()
            .contains(&format!("after_event_id={}", last.event_id)),
        "{status}"
    );
    assert!(got.len() < EVENTS, "it fell behind before the end");
    let fell_behind =
        |s: &[(String, f64)]| value(s, "holdfast_watch_ended_total", &["reason=\"fell_behind\""]);
    let after = samples(&scrape(&app).await);
    assert!(fell_behind(&after) >= fell_behind(&before) + 1.0);
    let mut resumed = watch(&app, last.event_id.clone()).await;
    let rest = ids(&mut resumed, EVENTS - got.len()).await;
    let all: Vec<String> = got.into_iter().map(|e| e.hold_id).chain(rest).collect();
    let expected: Vec<String> = (0..EVENTS).map(|n| format!("g{n}")).collect();
    assert_eq!(
        all, expected,
        "every event once, in order, across the two streams"
    );
    app.shutdown().await;
}

/// At shutdown a subscriber's stream ends UNAVAILABLE, naming the last
/// event it was sent.
#[tokio::test]
async fn a_shutdown_ends_a_subscription_with_where_to_resume() {
    let app = spawn_app().await;
    app.live_sale("w", &[("p", Some(10))], 0).await;
    let mut stream = watch(&app, String::new()).await;
    claims(&app, 0, 2).await;
    let seen = ids(&mut stream, 2).await;
    assert_eq!(seen, expected(0, 2));
    let key = format!("{}:{{dev}}:events", app.redis_prefix);
    let newest: redis::streams::StreamRangeReply = app
        .redis()
        .await
        .xrevrange_count(&key, "+", "-", 1)
        .await
        .unwrap();
    let last = newest.ids[0].id.clone();
    let stopping = tokio::spawn(app.shutdown());
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream ends within 10 s");
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(
        status.message().contains(&format!("after_event_id={last}")),
        "{status}"
    );
    stopping.await.unwrap();
}
