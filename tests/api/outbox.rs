//! The outbox's claims on the store itself, where what a statement reads
//! can be counted: a round must cost the same whatever a satellite's
//! backlog, since a satellite that is down through a sale gathers one row
//! a sale and every round looks for every satellite's head.

use std::str::FromStr;
use std::time::Duration;

use holdfast::domain::{ChannelSlug, TenantId};
use holdfast::store::postgres::{DeliveryState, PgStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::fresh_database;

/// Pending rows of the satellite that is down: far more than a round
/// that looks only at heads could read.
const BACKLOG: usize = 10_000;

/// Rows read from the outbox so far by any scan, its table's and its
/// indexes'. `pg` has one connection, whose counts reach the shared
/// statistics once it has been told to flush and goes idle.
async fn rows_read(pg: &PgStore) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pg.pool())
        .await
        .expect("flush statistics");
    sqlx::query_scalar(
        "SELECT t.seq_tup_read + coalesce((SELECT sum(idx_tup_read) FROM pg_stat_user_indexes i
                                           WHERE i.relid = t.relid), 0)::bigint
         FROM pg_stat_user_tables t WHERE t.relname = 'outbox'",
    )
    .fetch_one(pg.pool())
    .await
    .expect("read statistics")
}

#[tokio::test]
async fn claims_read_each_satellites_next_row_not_the_backlog_beside_it() {
    let pg = store_with_satellites().await;
    // shop's eBay satellite is down: its backlog waits an hour for the
    // next attempt. shop's Whatnot satellite has a row before that
    // backlog and one after it; other's eBay satellite a row before.
    let first: Vec<i64> = queue(&pg, &[("shop", "whatnot"), ("other", "ebay")], "0").await;
    queue(&pg, &vec![("shop", "ebay"); BACKLOG], "1 hour").await;
    let later = queue(&pg, &[("shop", "whatnot")], "0").await;
    sqlx::query("ANALYZE outbox")
        .execute(pg.pool())
        .await
        .expect("analyze");

    let before = rows_read(&pg).await;
    let claimed = pg
        .claim_deliveries(Duration::from_secs(10), 32)
        .await
        .expect("claim");
    let read = rows_read(&pg).await - before;
    let mut got: Vec<(String, String, i64)> = claimed
        .into_iter()
        .map(|d| (d.workspace, d.channel, d.id))
        .collect();
    got.sort();
    // Each due satellite's oldest row, and nothing of the one in backoff.
    assert_eq!(
        got,
        vec![
            ("other".into(), "ebay".into(), first[1]),
            ("shop".into(), "whatnot".into(), first[0]),
        ]
    );
    assert!(
        read < 100,
        "claiming the heads read {read} outbox rows; the backlog of {BACKLOG} should not be walked"
    );

    // Whatnot acknowledges its row; the next is claimed past the backlog.
    let before = rows_read(&pg).await;
    let next = pg
        .delivered(&first[..1], 200, Some(Duration::from_secs(10)))
        .await
        .expect("delivered");
    let read = rows_read(&pg).await - before;
    assert_eq!(next.map(|d| d.id), Some(later[0]));
    assert!(
        read < 100,
        "finding Whatnot's next row read {read} outbox rows; the backlog of {BACKLOG} between should not be walked"
    );
    // The acknowledgement's commit did not wait for the WAL flush, but
    // the connection goes back to the pool as it came: the drainer's
    // commits on it must wait.
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(pg.pool())
        .await
        .expect("show");
    assert_eq!(setting, "on");
}

#[tokio::test]
async fn a_batch_is_read_and_acknowledged_past_the_backlog_beside_it() {
    let pg = store_with_satellites().await;
    sqlx::query(
        "UPDATE satellites SET batch_size = 3 WHERE workspace = 'shop' AND channel = 'ebay'",
    )
    .execute(pg.pool())
    .await
    .expect("batch size");
    // shop's eBay satellite has five rows due, with Whatnot's backlog of
    // 10,000 (waiting out a backoff) queued between its second and third.
    let mut ebay = queue(&pg, &[("shop", "ebay"); 2], "0").await;
    let whatnot = queue(&pg, &vec![("shop", "whatnot"); BACKLOG], "1 hour").await;
    ebay.extend(queue(&pg, &[("shop", "ebay"); 3], "0").await);
    sqlx::query("ANALYZE outbox")
        .execute(pg.pool())
        .await
        .expect("analyze");

    let lease = Duration::from_secs(10);
    let head = pg
        .claim_deliveries(lease, 32)
        .await
        .expect("claim")
        .into_iter()
        .find(|d| d.channel == "ebay" && d.workspace == "shop")
        .expect("eBay's head is due");
    assert_eq!((head.id, head.batch_size), (ebay[0], 3));

    let before = rows_read(&pg).await;
    let behind = pg.behind(&head, 2).await.expect("behind");
    let read = rows_read(&pg).await - before;
    assert_eq!(
        behind.iter().map(|b| b.id).collect::<Vec<_>>(),
        ebay[1..3],
        "the satellite's own next rows, in order"
    );
    assert!(read < 100, "reading a batch read {read} outbox rows");

    // The batch acknowledged: all three delivered, and the next claimed
    // is the first after the last of them.
    let before = rows_read(&pg).await;
    let next = pg
        .delivered(&ebay[..3], 200, Some(lease))
        .await
        .expect("delivered");
    let read = rows_read(&pg).await - before;
    assert_eq!(next.map(|d| d.id), Some(ebay[3]));
    assert!(read < 100, "acknowledging a batch read {read} outbox rows");
    let states: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, state FROM outbox WHERE id = ANY($1) ORDER BY id")
            .bind(&ebay)
            .fetch_all(pg.pool())
            .await
            .expect("states");
    let delivered: Vec<i64> = states
        .iter()
        .filter(|(_, s)| s == "delivered")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(delivered, ebay[..3]);
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id = ANY($1) AND state = 'pending'")
            .bind(&whatnot)
            .fetch_one(pg.pool())
            .await
            .expect("whatnot");
    assert_eq!(
        pending, BACKLOG as i64,
        "another satellite's rows are not its batch"
    );
}

#[tokio::test]
async fn old_deliveries_are_pruned_reading_only_what_is_deleted() {
    let pg = store_with_satellites().await;
    // Kept: a backlog of 10,000 waiting since long ago (a satellite down
    // for days), and as many acknowledged a moment ago. Past the
    // retention: three acknowledged two days ago.
    let waiting = queue(&pg, &vec![("shop", "ebay"); BACKLOG], "0").await;
    let old = queue(&pg, &[("other", "ebay"); 3], "0").await;
    let recent = queue(&pg, &vec![("shop", "whatnot"); BACKLOG], "0").await;
    sqlx::query(
        "UPDATE outbox SET created_at = now() - interval '3 days' WHERE id = ANY($1) OR id = ANY($2)",
    )
    .bind(&waiting)
    .bind(&old)
    .execute(pg.pool())
    .await
    .expect("age");
    acknowledge(&pg, &old, "2 days").await;
    acknowledge(&pg, &recent, "0").await;
    sqlx::query("ANALYZE outbox")
        .execute(pg.pool())
        .await
        .expect("analyze");

    let day = Duration::from_secs(86_400);
    let before = rows_read(&pg).await;
    let deleted = pg.prune_deliveries(day, 10_000).await.expect("prune");
    let read = rows_read(&pg).await - before;
    assert_eq!(deleted, 3);
    assert!(
        read < 100,
        "pruning 3 rows read {read} outbox rows; the {BACKLOG} waiting and {BACKLOG} recent should not be read"
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(pg.pool())
        .await
        .expect("left");
    let kept: Vec<i64> = waiting.iter().chain(&recent).copied().collect();
    assert_eq!(left, kept, "only the old acknowledged rows go");
    assert_eq!(pg.prune_deliveries(day, 10_000).await.expect("prune"), 0);
}

#[tokio::test]
async fn a_shops_deliveries_are_listed_without_reading_another_shops() {
    let pg = store_with_satellites().await;
    let quiet = queue(&pg, &[("other", "ebay"); 3], "0").await;
    queue(&pg, &vec![("shop", "ebay"); BACKLOG], "0").await;
    sqlx::query("ANALYZE outbox")
        .execute(pg.pool())
        .await
        .expect("analyze");

    let other = TenantId::parse("other").unwrap();
    let before = rows_read(&pg).await;
    let listed = pg
        .deliveries(&other, None, None, 0, 50)
        .await
        .expect("list deliveries");
    let read = rows_read(&pg).await - before;
    let ids: Vec<i64> = listed.iter().map(|d| d.id).collect();
    assert_eq!(
        ids,
        quiet.iter().rev().copied().collect::<Vec<_>>(),
        "newest first"
    );
    assert!(
        read < 100,
        "listing a shop's 3 deliveries read {read} outbox rows; another shop's {BACKLOG} should not be read"
    );
}

/// Each page a shop asks for reads about what it returns, whatever else
/// its outbox holds: one channel's beside another's backlog, the waiting
/// ones beside the acknowledged, every channel's second page; and each
/// page is the newest first, merged across channels, none of another
/// shop's.
#[tokio::test]
async fn a_page_of_deliveries_reads_only_its_rows_on_a_reused_plan() {
    let pg = store_with_satellites().await;
    let shop = TenantId::parse("shop").unwrap();
    let whatnot = queue(&pg, &[("shop", "whatnot"), ("shop", "whatnot")], "0").await;
    queue(&pg, &[("other", "ebay")], "0").await;
    let acked = queue(&pg, &vec![("shop", "ebay"); BACKLOG], "0").await;
    let waiting = queue(&pg, &[("shop", "ebay")], "0").await;
    acknowledge(&pg, &[&acked[..], &whatnot[1..]].concat(), "0").await;
    // As autovacuum leaves it: the acknowledged rows' entries gone from
    // the index of pending rows.
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(pg.pool())
        .await
        .expect("vacuum");

    let ebay = ChannelSlug::parse("channel", "ebay").unwrap();
    let wn = ChannelSlug::parse("channel", "whatnot").unwrap();
    let newest_acked: Vec<i64> = acked.iter().rev().take(3).copied().collect();
    // (what, its channel, its state, the page token's id, the page)
    let pending = Some(DeliveryState::Pending);
    let pages = [
        (
            "whatnot's",
            Some(&wn),
            None,
            0,
            vec![whatnot[1], whatnot[0]],
        ),
        (
            "the waiting ones",
            None,
            pending,
            0,
            vec![waiting[0], whatnot[0]],
        ),
        (
            "ebay's waiting ones",
            Some(&ebay),
            pending,
            0,
            waiting.clone(),
        ),
        (
            "the acknowledged ones",
            None,
            Some(DeliveryState::Delivered),
            0,
            newest_acked,
        ),
        (
            "a second page",
            None,
            None,
            acked[1],
            vec![acked[0], whatnot[1], whatnot[0]],
        ),
    ];
    for (what, channel, state, before, want) in pages {
        let read = rows_read(&pg).await;
        let got = pg
            .deliveries(&shop, channel, state, before, 3)
            .await
            .expect("list deliveries");
        let read = rows_read(&pg).await - read;
        let ids: Vec<i64> = got.iter().map(|d| d.id).collect();
        assert_eq!(ids, want, "{what}");
        assert!(
            read < 100,
            "{what}: a page of {} read {read} outbox rows",
            ids.len()
        );
    }
}

#[tokio::test]
async fn a_retry_brings_a_backoff_forward_and_leaves_an_attempt_in_flight_alone() {
    let pg = store_with_satellites().await;
    let shop = TenantId::parse("shop").unwrap();
    // shop's eBay satellite waits out an hour's backoff with a backlog
    // behind its head; shop's Whatnot satellite is being sent its row
    // (claimed, leased); other's eBay satellite waits out a backoff too.
    let ebay = queue(&pg, &vec![("shop", "ebay"); BACKLOG], "1 hour").await;
    let whatnot = queue(&pg, &[("shop", "whatnot")], "0").await;
    let other = queue(&pg, &[("other", "ebay")], "1 hour").await;
    let lease = Duration::from_secs(600);
    let claimed = pg.claim_deliveries(lease, 32).await.expect("claim");
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), whatnot);
    sqlx::query("ANALYZE outbox")
        .execute(pg.pool())
        .await
        .expect("analyze");

    // What each of shop's satellites waits on: its oldest row.
    let before = rows_read(&pg).await;
    let waiting = pg.waiting_deliveries(&shop).await.expect("waiting");
    let read = rows_read(&pg).await - before;
    let heads: Vec<(String, i64)> = waiting.into_iter().map(|d| (d.channel, d.id)).collect();
    assert_eq!(
        heads,
        vec![
            ("ebay".to_owned(), ebay[0]),
            ("whatnot".to_owned(), whatnot[0])
        ]
    );
    assert!(
        read < 100,
        "reading what each satellite waits on read {read} outbox rows"
    );

    let before = rows_read(&pg).await;
    let retried = pg.retry_deliveries(&shop, None).await.expect("retry");
    let read = rows_read(&pg).await - before;
    assert_eq!(retried, vec!["ebay".to_owned()], "not the leased head");
    assert!(
        read < 100,
        "retrying read {read} outbox rows; only each satellite's head counts"
    );
    // eBay's head is due; the rows behind it, the lease and the other
    // shop's backoff are as they were.
    let claimed = pg.claim_deliveries(lease, 32).await.expect("claim");
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), [ebay[0]]);
    let due: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= now() ORDER BY id",
    )
    .fetch_all(pg.pool())
    .await
    .expect("due rows");
    assert!(due.is_empty(), "due after the claims: {due:?}");

    // Whatnot's attempt fails: its backoff can be brought forward, one
    // channel at a time.
    pg.delivery_failed(whatnot[0], Some(503), "down", Duration::from_secs(3600))
        .await
        .expect("failed");
    let whatnot_slug = ChannelSlug::parse("channel", "whatnot").unwrap();
    let before = rows_read(&pg).await;
    let retried = pg
        .retry_deliveries(&shop, Some(&whatnot_slug))
        .await
        .expect("retry");
    let read = rows_read(&pg).await - before;
    assert_eq!(retried, vec!["whatnot".to_owned()]);
    assert!(
        read < 100,
        "retrying Whatnot read {read} outbox rows; eBay's backlog before it should not be walked"
    );
    let claimed = pg.claim_deliveries(lease, 32).await.expect("claim");
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), whatnot);
    let other_due: bool =
        sqlx::query_scalar("SELECT next_attempt_at <= now() FROM outbox WHERE id = $1")
            .bind(other[0])
            .fetch_one(pg.pool())
            .await
            .expect("other's row");
    assert!(!other_due, "another shop's retry is its own");
}

/// A store on a fresh database of one connection, with satellites for
/// shop's eBay and Whatnot channels and other's eBay channel.
///
/// Its statements are planned for any parameters (`plan_cache_mode`),
/// as Postgres plans a prepared statement it has run five times: a
/// test's few runs would otherwise get plans made for their values,
/// where a condition such as `$2 IS NULL OR channel = $2` becomes an
/// index's bound, and a daemon's would not.
async fn store_with_satellites() -> PgStore {
    let url = fresh_database().await;
    let options = PgConnectOptions::from_str(&url)
        .expect("database url")
        .options([("plan_cache_mode", "force_generic_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("connect");
    let pg = PgStore::from_pool(pool);
    pg.migrate().await.expect("migrate");
    sqlx::raw_sql(
        "INSERT INTO tenants (id) VALUES ('shop'), ('other');
         INSERT INTO channels (workspace, slug, name)
             VALUES ('shop', 'ebay', 'eBay'), ('shop', 'whatnot', 'Whatnot'), ('other', 'ebay', 'eBay');
         INSERT INTO satellites (workspace, channel, base_url, secret)
             SELECT workspace, slug, 'http://127.0.0.1:9', 'a-secret-of-sixteen' FROM channels;",
    )
    .execute(pg.pool())
    .await
    .expect("satellites");
    pg
}

/// Marks the rows `ids` acknowledged, `ago` (an interval) ago.
async fn acknowledge(pg: &PgStore, ids: &[i64], ago: &str) {
    sqlx::query(
        "UPDATE outbox SET state = 'delivered', delivered_at = now() - $2::interval
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(ago)
    .execute(pg.pool())
    .await
    .expect("acknowledge");
}

/// Queues a webhook for each (workspace, channel) of `to`, in order,
/// first attempted after `wait`; returns their ids.
async fn queue(pg: &PgStore, to: &[(&str, &str)], wait: &str) -> Vec<i64> {
    let (workspaces, channels): (Vec<&str>, Vec<&str>) = to.iter().copied().unzip();
    sqlx::query_scalar(
        "INSERT INTO outbox (workspace, channel, event, body, card_count, next_attempt_at)
         SELECT w, c, 'bulk-disengage', '{}', 1, now() + $3::interval
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t (w, c, n) ORDER BY n RETURNING id",
    )
    .bind(workspaces)
    .bind(channels)
    .bind(wait)
    .fetch_all(pg.pool())
    .await
    .expect("queue webhooks")
}
