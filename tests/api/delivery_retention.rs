//! Acknowledged webhooks are kept for `--delivery-retention-secs`, then
//! deleted; one not yet acknowledged is kept however old.

use holdfast::grpc::pb;

use crate::cards::{delivered, deliveries, dual_listing, engage, lock, satellite};
use crate::helpers::spawn_app_with;

#[tokio::test]
async fn acknowledged_deliveries_go_after_the_retention_and_waiting_ones_stay() {
    let app = spawn_app_with(|a| {
        a.delivery_retention_secs = 1;
        a.outbox_interval_ms = 100;
        a.webhook_backoff_base_ms = 3_600_000;
    })
    .await;
    dual_listing(&app, true).await;
    for channel in ["storefront", "ebay", "whatnot"] {
        engage(&app, channel, &["card-1"]).await;
    }
    let _ebay = satellite(&app, "ebay").await;
    let whatnot = satellite(&app, "whatnot").await;
    whatnot.fail_next("bulk-disengage", 1);
    lock(&app, "sale", "storefront", &["card-1"]).await;
    app.locks()
        .complete_sale_locks(pb::CompleteSaleLocksRequest {
            lock_ref: "sale".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    delivered(&app, "ebay", "bulk-disengage").await;
    app.eventually("whatnot's attempt failed", || async {
        deliveries(&app, "whatnot", "bulk-disengage")
            .await
            .iter()
            .any(|d| d.attempts == 1)
            .then_some(())
    })
    .await;

    // A second or so later, ebay's acknowledged deliveries are gone;
    // whatnot's waiting one (retried in an hour) stays.
    app.eventually("ebay's acknowledged deliveries deleted", || async {
        deliveries(&app, "ebay", "bulk-disengage")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let waiting = deliveries(&app, "whatnot", "bulk-disengage").await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0].state(), pb::DeliveryState::Pending);
    app.shutdown().await;
}
