//! Talking to satellites: signed webhooks out, canonical card lists in.
//!
//! Every request carries `X-Holdfast-Timestamp` (unix seconds) and
//! `X-Holdfast-Signature: sha256=<hex>`, the HMAC-SHA256 of
//! `"<timestamp>.<body>"` under the satellite's secret (the body of a GET
//! is empty). A satellite recomputes it over the raw body it received,
//! compares in constant time, and refuses timestamps far from its clock, so
//! a captured request cannot be replayed later. The README has the scheme
//! for satellite implementers.
//!
//! The client is hyper-util's pooled HTTP/1.1 client, the stack tonic
//! already builds on. Plain `http://` only: TLS to satellites would need a
//! TLS stack this daemon does not carry yet (see the README).

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

/// The header carrying the signing time, unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-holdfast-timestamp";
/// The header carrying `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-holdfast-signature";
/// The header carrying the outbox row id: the same on every retry, so a
/// satellite can drop duplicates.
pub const DELIVERY_HEADER: &str = "x-holdfast-delivery";
/// The header carrying the event name.
pub const EVENT_HEADER: &str = "x-holdfast-event";
/// The header on a batch carrying how many webhooks it holds.
pub const COUNT_HEADER: &str = "x-holdfast-deliveries";
/// Largest canonical list a satellite may answer with.
const MAX_LIST_BYTES: usize = 16 << 20;

/// The signature header's value for `body` signed at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Checks a base URL a caller gives for a satellite: `http://host[:port][/path]`.
pub fn check_base_url(value: &str) -> Result<String, String> {
    let trimmed = value.trim_end_matches('/');
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|e| format!("is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported yet: put a TLS-terminating proxy in front of the satellite, or use http on a private network".into(),
            );
        }
        _ => return Err("must start with http://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    Ok(trimmed.to_owned())
}

/// The hosts satellites may be on (`--satellite-hosts`): names, or
/// `*.suffix` for every name under a domain, matched without regard to
/// case. Empty: any host. A tenant's admin chooses its satellites' URLs,
/// and the daemon sends requests there from inside the operator's network:
/// where tenants are not the operator's own, the list keeps their URLs off
/// the operator's other services (a metadata endpoint, a database's HTTP
/// port). Names, not addresses, are matched, so the operator trusts what
/// those names resolve to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// The list, from the flag's values.
    pub fn new(hosts: &[String]) -> Self {
        Self(
            hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        )
    }

    /// Whether `url`'s host is on the list (an empty list allows any).
    pub fn check(&self, url: &str) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let host = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        let allowed = self.0.iter().any(|h| match h.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => *h == host,
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "host {host:?} is not one this daemon may call (--satellite-hosts: {})",
                self.0.join(",")
            ))
        }
    }
}

/// One webhook: an outbox row.
#[derive(Debug, Clone, Copy)]
pub struct Webhook<'a> {
    /// The outbox row id, the same on every retry: what a satellite
    /// drops repeats by.
    pub id: i64,
    /// The event.
    pub event: &'a str,
    /// The JSON body, as stored.
    pub body: &'a str,
}

/// A batch's body: `{"deliveries": [{"id": 7, "event": "engage", "body":
/// {...}}, ...]}`, in the order given. Each body goes in as stored: the
/// daemon wrote it as JSON.
pub fn batch_body(webhooks: &[Webhook<'_>]) -> String {
    let mut out = String::with_capacity(
        32 + webhooks
            .iter()
            .map(|w| w.body.len() + w.event.len() + 48)
            .sum::<usize>(),
    );
    out.push_str("{\"deliveries\":[");
    for (i, w) in webhooks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let event = serde_json::Value::from(w.event);
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{{\"id\":{},\"event\":{event},\"body\":{}}}",
            w.id, w.body
        );
    }
    out.push_str("]}");
    out
}

/// Why a request to a satellite did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The HTTP status, when the satellite answered.
    pub status: Option<u16>,
    /// What went wrong, for the delivery's record.
    pub reason: String,
}

/// An HTTP client for satellites. Cheap to clone.
#[derive(Clone)]
pub struct SatelliteClient {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    allowed: AllowedHosts,
}

impl SatelliteClient {
    /// A client whose every request gives up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            timeout,
            allowed: AllowedHosts::default(),
        }
    }

    /// The same client, calling only hosts on `allowed`.
    pub fn with_allowed_hosts(mut self, allowed: AllowedHosts) -> Self {
        self.allowed = allowed;
        self
    }

    /// Whether a satellite at `base_url` may be called.
    pub fn check_host(&self, base_url: &str) -> Result<(), String> {
        self.allowed.check(base_url)
    }

    /// POSTs a signed webhook to `<base_url>/webhooks/<event>`; Ok with the
    /// status when the satellite answered 2xx.
    pub async fn post(
        &self,
        base_url: &str,
        secret: &str,
        webhook: &Webhook<'_>,
    ) -> Result<u16, Failure> {
        let req = http::Request::post(format!("{base_url}/webhooks/{}", webhook.event))
            .header(DELIVERY_HEADER, webhook.id)
            .header(EVENT_HEADER, webhook.event);
        self.post_signed(req, secret, webhook.body.as_bytes().to_vec())
            .await
    }

    /// POSTs a signed batch of webhooks, in order, to `<base_url>/webhooks`
    /// ([`batch_body`]); Ok with the status when the satellite answered
    /// 2xx, which acknowledges every one.
    pub async fn post_batch(
        &self,
        base_url: &str,
        secret: &str,
        webhooks: &[Webhook<'_>],
    ) -> Result<u16, Failure> {
        let req = http::Request::post(format!("{base_url}/webhooks"))
            .header(COUNT_HEADER, webhooks.len());
        self.post_signed(req, secret, batch_body(webhooks).into_bytes())
            .await
    }

    /// Signs `body` and sends it as JSON with the rest of `req`.
    async fn post_signed(
        &self,
        req: http::request::Builder,
        secret: &str,
        body: Vec<u8>,
    ) -> Result<u16, Failure> {
        let ts = chrono::Utc::now().timestamp();
        let req = req
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "holdfast")
            .header(TIMESTAMP_HEADER, ts)
            .header(SIGNATURE_HEADER, sign(secret, ts, &body))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| failure(None, format!("cannot build the request: {e}")))?;
        // The status alone answers: a 2xx with a long body (an echo, a
        // framework's page) is delivered, not a failure to retry forever
        // at the head of the satellite's queue.
        let (status, _) = self.send(req, 0).await?;
        Ok(status)
    }

    /// GETs a satellite's canonical list of active cards from
    /// `<base_url>/active-cards`: a JSON object `{"card_ids": [...]}`.
    pub async fn active_cards(&self, base_url: &str, secret: &str) -> Result<Vec<String>, Failure> {
        let ts = chrono::Utc::now().timestamp();
        let req = http::Request::get(format!("{base_url}/active-cards"))
            .header(http::header::USER_AGENT, "holdfast")
            .header(TIMESTAMP_HEADER, ts)
            .header(SIGNATURE_HEADER, sign(secret, ts, b""))
            .body(Full::new(Bytes::new()))
            .map_err(|e| failure(None, format!("cannot build the request: {e}")))?;
        let (status, body) = self.send(req, MAX_LIST_BYTES).await?;
        #[derive(serde::Deserialize)]
        struct List {
            card_ids: Vec<String>,
        }
        let list: List = serde_json::from_slice(&body).map_err(|e| {
            failure(
                Some(status),
                format!("the answer is not {{\"card_ids\": [...]}}: {e}"),
            )
        })?;
        Ok(list.card_ids)
    }

    /// Sends a request within the timeout; Ok with the status and up to
    /// `max_body` bytes of body when the status is 2xx (none read when
    /// `max_body` is 0).
    async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<(u16, Bytes), Failure> {
        // Checked at every call as well as when the satellite was put: the
        // list may have been narrowed since.
        self.allowed
            .check(&req.uri().to_string())
            .map_err(|why| failure(None, why))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| failure(None, format!("request failed: {e}")))?;
            let status = resp.status().as_u16();
            if !(200..300).contains(&status) {
                return Err(failure(Some(status), format!("answered HTTP {status}")));
            }
            if max_body == 0 {
                return Ok((status, Bytes::new()));
            }
            let body = Limited::new(resp.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| failure(Some(status), format!("reading the answer failed: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| failure(None, format!("no answer within {:?}", self.timeout)))?
    }
}

fn failure(status: Option<u16>, reason: String) -> Failure {
    Failure { status, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // A value computed independently, with:
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign("secret", 1_700_000_000, b"{}"),
            "sha256=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[test]
    fn a_batch_is_the_webhooks_in_order_each_body_as_stored() {
        let body = batch_body(&[
            Webhook {
                id: 7,
                event: "engage",
                body: r#"{"card_id":"c1"}"#,
            },
            Webhook {
                id: 9,
                event: "bulk-disengage",
                body: r#"{"card_ids":["c1","c\"2"]}"#,
            },
        ]);
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("a batch is JSON");
        assert_eq!(
            parsed,
            serde_json::json!({"deliveries": [
                {"id": 7, "event": "engage", "body": {"card_id": "c1"}},
                {"id": 9, "event": "bulk-disengage", "body": {"card_ids": ["c1", "c\"2"]}},
            ]})
        );
        assert_eq!(batch_body(&[]), r#"{"deliveries":[]}"#);
    }

    #[test]
    fn only_listed_hosts_are_allowed_once_there_is_a_list() {
        let any = AllowedHosts::new(&[]);
        assert!(any.check("http://169.254.169.254/latest").is_ok());
        let list = AllowedHosts::new(&["tot.internal".into(), " *.Shop.Example ".into()]);
        for ok in [
            "http://tot.internal:8080/hooks",
            "http://TOT.internal",
            "http://a.shop.example/x",
            "http://b.a.shop.example",
        ] {
            assert!(list.check(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://169.254.169.254/latest",
            "http://localhost:5432",
            "http://shop.example",
            "http://evilshop.example",
            "http://tot.internal.evil.example",
            "not a url",
        ] {
            assert!(list.check(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn base_urls_are_plain_http_with_a_host() {
        assert_eq!(
            check_base_url("http://tot.internal:8080/hooks/").unwrap(),
            "http://tot.internal:8080/hooks"
        );
        assert!(check_base_url("https://tot.example").is_err());
        assert!(check_base_url("ftp://x").is_err());
        assert!(check_base_url("http://x/?a=1").is_err());
        assert!(check_base_url("not a url").is_err());
    }
}
