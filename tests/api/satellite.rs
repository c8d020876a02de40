//! A real satellite for the tests: an HTTP/1.1 server on a loopback port,
//! written by hand on a tokio listener, that checks every request's
//! signature the way the README tells satellite implementers to, records
//! what it received, can be told to fail or to stop answering, and serves
//! a canonical list of active cards. It takes webhooks one at a time
//! (`/webhooks/<event>`) and in batches (`/webhooks`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One webhook the satellite received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The event, from the path `/webhooks/<event>` or the batch.
    pub event: String,
    /// The JSON body.
    pub body: serde_json::Value,
    /// `X-Holdfast-Delivery`, or the batch's `id`.
    pub delivery: String,
    /// How many webhooks its request held: `None` when it came alone.
    pub batch: Option<usize>,
    /// Whether the signature and timestamp checked out.
    pub signed: bool,
    /// What the satellite answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Failures still to answer, by event.
    fail_next: HashMap<String, u32>,
    /// The canonical list served at /active-cards.
    active: Vec<String>,
    /// Requests read and not yet answered, while silent.
    held: usize,
}

/// A running test satellite; stops when dropped.
pub struct Satellite {
    /// Where it listens, `http://127.0.0.1:<port>`.
    pub base_url: String,
    state: Arc<Mutex<State>>,
    /// True while requests are held unanswered.
    silent: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Satellite {
    /// Starts a satellite with `secret` on a free port.
    pub async fn start(secret: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (silent, hold) = watch::channel(false);
        let task = tokio::spawn(serve(listener, secret.to_owned(), state.clone(), hold));
        Self {
            base_url,
            state,
            silent,
            task,
        }
    }

    /// While `on`, holds each request it reads unanswered (a satellite
    /// that hangs: the daemon waits out its timeout); off again, answers
    /// them.
    pub fn silence(&self, on: bool) {
        self.silent.send_replace(on);
    }

    /// Requests held unanswered right now.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held
    }

    /// Answers the next `n` webhooks of `event` with HTTP 500 (and each
    /// batch that holds one, counted once).
    pub fn fail_next(&self, event: &str, n: u32) {
        self.state.lock().unwrap().fail_next.insert(event.into(), n);
    }

    /// Sets the list served at /active-cards.
    pub fn set_active(&self, cards: &[&str]) {
        self.state.lock().unwrap().active = cards.iter().map(|c| (*c).to_owned()).collect();
    }

    /// The webhooks received for `event`, in order (failed attempts too).
    pub fn received(&self, event: &str) -> Vec<Received> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.event == event)
            .cloned()
            .collect()
    }
}

impl Drop for Satellite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a satellite implementer does: HMAC-SHA256 over
/// `"<timestamp>.<raw body>"`, compared with the header, and a timestamp
/// within five minutes of now.
pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - ts).abs() > 300 {
        return false;
    }
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Some(given) = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// A batch's webhooks, `{"deliveries": [{"id", "event", "body"}, ...]}`,
/// as (id, event, body); none when the body is not such a batch.
fn read_batch(body: &[u8]) -> Vec<(i64, String, serde_json::Value)> {
    let Ok(batch) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let Some(deliveries) = batch["deliveries"].as_array() else {
        return Vec::new();
    };
    deliveries
        .iter()
        .filter_map(|d| {
            Some((
                d["id"].as_i64()?,
                d["event"].as_str()?.to_owned(),
                d["body"].clone(),
            ))
        })
        .collect()
}

async fn serve(
    listener: TcpListener,
    secret: String,
    state: Arc<Mutex<State>>,
    silent: watch::Receiver<bool>,
) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let (secret, state, silent) = (secret.clone(), state.clone(), silent.clone());
        tokio::spawn(async move {
            let _ = handle(socket, &secret, &state, silent).await;
        });
    }
}

/// One request per connection (`connection: close`).
async fn handle(
    mut socket: TcpStream,
    secret: &str,
    state: &Mutex<State>,
    mut silent: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (
        request_line.next().unwrap_or_default().to_owned(),
        request_line.next().unwrap_or_default().to_owned(),
    );
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if *silent.borrow() {
        state.lock().unwrap().held += 1;
        let _ = silent.wait_for(|s| !*s).await;
        state.lock().unwrap().held -= 1;
    }
    let body = &buf[head_end..(head_end + length).min(buf.len())];
    let header = |name: &str| headers.get(name).cloned().unwrap_or_default();
    let signed = verify(
        secret,
        &header("x-holdfast-timestamp"),
        body,
        &header("x-holdfast-signature"),
    );
    let (status, answer) = match (method.as_str(), path.strip_prefix("/webhooks/")) {
        ("POST", Some(event)) => {
            let mut st = state.lock().unwrap();
            let failing = st.fail_next.get_mut(event).filter(|n| **n > 0);
            let status = match failing {
                Some(n) => {
                    *n -= 1;
                    500
                }
                None if signed => 200,
                None => 401,
            };
            st.received.push(Received {
                event: event.to_owned(),
                body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
                delivery: header("x-holdfast-delivery"),
                batch: None,
                signed,
                status,
            });
            // A long answer, as a satellite that echoes what it got (or a
            // framework's page) sends: the status alone must count.
            let answer = serde_json::json!({ "ok": status == 200, "echo": "x".repeat(8192) });
            (status, answer.to_string())
        }
        ("POST", None) if path == "/webhooks" => {
            let batch = read_batch(body);
            let mut st = state.lock().unwrap();
            let failing = batch
                .iter()
                .find(|(_, event, _)| st.fail_next.get(event).is_some_and(|n| *n > 0))
                .map(|(_, event, _)| event.clone());
            let status = match failing {
                Some(event) => {
                    *st.fail_next.get_mut(&event).unwrap() -= 1;
                    500
                }
                None if signed && !batch.is_empty() => 200,
                None if signed => 400,
                None => 401,
            };
            let size = batch.len();
            for (id, event, body) in batch {
                st.received.push(Received {
                    event,
                    body,
                    delivery: id.to_string(),
                    batch: Some(size),
                    signed,
                    status,
                });
            }
            (
                status,
                serde_json::json!({ "ok": status == 200 }).to_string(),
            )
        }
        ("GET", None) if path == "/active-cards" && signed => {
            let active = state.lock().unwrap().active.clone();
            (200, serde_json::json!({ "card_ids": active }).to_string())
        }
        _ => (404, "{}".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    socket.write_all(reply.as_bytes()).await?;
    socket.shutdown().await
}
