//! A satellite that takes batches (`PutSatellite`'s `batch_size`): its
//! backlog goes several webhooks a request, in order, each request
//! acknowledged or failed whole, so that a satellite far from the daemon
//! is told of a batch a round trip rather than one webhook.

use holdfast::grpc::pb;

use crate::cards::{delivered_at_least, deliveries, satellite_taking, satellites};
use crate::helpers::{TestApp, spawn_app};
use crate::redelivery::{
    ebay_taking_batches_down_through_sales, retried, retrying_hourly, waiting_on,
};
use crate::satellite::{Received, Satellite};

/// Sends the rows waiting behind eBay's failed head now.
async fn retry_ebay(app: &TestApp) {
    assert_eq!(retried(app, "ebay").await, ["ebay"]);
}

/// The bulk-disengages `ebay` received, as the sizes of the requests
/// they came in and their ids in order of arrival.
fn requests(ebay: &Satellite) -> (Vec<usize>, Vec<i64>) {
    let got: Vec<Received> = ebay.received("bulk-disengage");
    let mut sizes = Vec::new();
    let mut left = 0;
    for r in &got {
        let size = r
            .batch
            .expect("a satellite that takes batches gets only batches");
        if left == 0 {
            sizes.push(size);
            left = size;
        }
        left -= 1;
        assert!(r.signed, "{r:?}");
    }
    let ids = got.iter().map(|r| r.delivery.parse().unwrap()).collect();
    (sizes, ids)
}

#[tokio::test]
async fn a_backlog_goes_in_batches_of_at_most_the_size_in_order() {
    let app = retrying_hourly().await;
    let ebay = ebay_taking_batches_down_through_sales(&app, 5, 3).await;
    let queued: Vec<i64> = {
        let mut ids: Vec<i64> = deliveries(&app, "ebay", "bulk-disengage")
            .await
            .iter()
            .map(|d| d.delivery_id)
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(queued.len(), 5, "a sale a webhook");
    let (failed, _) = requests(&ebay);

    retry_ebay(&app).await;
    delivered_at_least(&app, "ebay", "bulk-disengage", queued.len()).await;
    let (sizes, ids) = requests(&ebay);
    // The retried backlog: 5 rows at most 3 a request, each once, in order.
    let retried = &ids[ids.len() - queued.len()..];
    assert_eq!(retried, queued, "each once, in order");
    assert_eq!(&sizes[failed.len()..], [3, 2]);
    assert_eq!(waiting_on(&app, "ebay").await, None);
    app.shutdown().await;
}

#[tokio::test]
async fn a_batch_that_fails_is_failed_whole_and_sent_again_whole() {
    let app = retrying_hourly().await;
    let ebay = ebay_taking_batches_down_through_sales(&app, 4, 10).await;
    let (failed, _) = requests(&ebay);

    // Still down when retried: the batch of four fails, and none of it
    // counts as delivered.
    ebay.fail_next("bulk-disengage", 1);
    retry_ebay(&app).await;
    app.eventually("the retried batch failed", || async {
        waiting_on(&app, "ebay")
            .await
            .filter(|w| w.attempts == 2)
            .map(|_| ())
    })
    .await;
    let d = deliveries(&app, "ebay", "bulk-disengage").await;
    assert_eq!(d.len(), 4);
    assert!(
        d.iter().all(|d| d.state() == pb::DeliveryState::Pending),
        "a failed batch leaves every row pending: {d:?}"
    );
    let (sizes, _) = requests(&ebay);
    assert_eq!(&sizes[failed.len()..], [4]);

    // Back: the same four go again, in one request.
    retry_ebay(&app).await;
    delivered_at_least(&app, "ebay", "bulk-disengage", 4).await;
    let (sizes, ids) = requests(&ebay);
    assert_eq!(&sizes[failed.len()..], [4, 4]);
    let n = ids.len();
    assert_eq!(ids[n - 8..n - 4], ids[n - 4..], "the same rows again");
    app.shutdown().await;
}

#[tokio::test]
async fn the_batch_size_is_shown_and_zero_means_one_at_a_time() {
    let app = spawn_app().await;
    let _ebay = satellite_taking(&app, "ebay", 32).await;
    let _whatnot = satellite_taking(&app, "whatnot", 0).await;
    let sizes: Vec<(String, u32)> = satellites(&app)
        .await
        .into_iter()
        .map(|s| (s.channel, s.batch_size))
        .collect();
    assert_eq!(sizes, [("ebay".to_owned(), 32), ("whatnot".to_owned(), 1)]);
    app.shutdown().await;
}
