//! A fake Telegram Bot API server on loopback, for tests and the demo.
//!
//! It speaks enough of the Bot API for teloxide's polling dispatcher and for a bot that sends
//! and edits messages: `getMe`, `getWebhookInfo`, `deleteWebhook`, long-polling `getUpdates`,
//! `sendMessage`, `editMessageText`, `sendDocument` (multipart upload), `answerCallbackQuery`,
//! `setMyCommands`, `getMyCommands`, `deleteMyCommands`. Method names match case-insensitively
//! (teloxide sends `GetMe`); parameters may come as JSON, as a form, as multipart or in the
//! query string.
//!
//! It is as unkind as Telegram where a bot can get things wrong ([`Limits`]): messages (sends,
//! edits and documents alike) beyond about one per second in a chat or about thirty per second
//! overall are answered 429 with `retry_after`; `callback_data` over 64 bytes is refused
//! (`BUTTON_DATA_INVALID`); documents over 50 MB are refused (413), as the Bot API does.
//!
//! Tests drive it from the user's side ([`FakeBotApi::push_message`],
//! [`FakeBotApi::push_callback`]), read what the bot did ([`FakeBotApi::calls`],
//! [`FakeBotApi::transcript`]) and inject faults ([`FakeBotApi::fail_call`]). Like the real
//! server it answers `editMessageText` with the same text and markup by "message is not
//! modified". It never answers with a 5xx: a test bug shows up as a 400 naming the problem.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequest, Multipart, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

/// The bot's own user id, as `getMe` reports it.
pub const BOT_USER_ID: i64 = 4_000_000_001;
/// The bot's username, as `getMe` reports it.
pub const BOT_USERNAME: &str = "storinator_test_bot";

/// The exact description Telegram uses (teloxide maps it to `ApiError::MessageNotModified`).
pub const NOT_MODIFIED: &str = "Bad Request: message is not modified: specified new message \
    content and reply markup are exactly the same as a current content and reply markup of the message";

/// Longest a `getUpdates` call is held open, whatever timeout it asks for.
const MAX_POLL: Duration = Duration::from_secs(30);

/// Largest document a bot may upload through the Bot API (50 MB).
pub const MAX_UPLOAD: u64 = 50 * 1024 * 1024;

/// Longest `callback_data` Telegram accepts, in bytes.
pub const MAX_CALLBACK_DATA: usize = 64;

/// Methods that count as a message against the rate limits.
const MESSAGE_METHODS: &[&str] = &[
    "sendmessage",
    "editmessagetext",
    "editmessagereplymarkup",
    "senddocument",
];

/// The message rate limits the server enforces, as token buckets: a chat may receive
/// `chat_burst` messages at once and one more every `chat_interval`; the bot as a whole
/// `global_burst` at once and one more every `global_interval`. A message beyond them is
/// answered 429 with `retry_after` (whole seconds, at least 1, as Telegram sends it).
/// Telegram documents "about one message per second" in a chat and "about 30 per second"
/// overall, with short bursts allowed: [`Limits::telegram`]. `jitter` is how much earlier than
/// its token a message may arrive and still pass: a client can pace its sends but not their
/// arrival (a new connection delays one request more than the next), and Telegram's limits
/// are no more exact than that.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub chat_burst: u32,
    pub chat_interval: Duration,
    pub global_burst: u32,
    pub global_interval: Duration,
    pub jitter: Duration,
}

impl Limits {
    /// Telegram's figures.
    pub fn telegram() -> Limits {
        Limits {
            chat_burst: 3,
            chat_interval: Duration::from_secs(1),
            global_burst: 30,
            global_interval: Duration::from_secs(1) / 30,
            jitter: Duration::from_millis(50),
        }
    }

    /// The same limits `factor` times faster (tests keep their shape without the waiting).
    pub fn faster(self, factor: u32) -> Limits {
        Limits {
            chat_interval: self.chat_interval / factor,
            global_interval: self.global_interval / factor,
            ..self
        }
    }

    /// No limits at all.
    pub fn none() -> Limits {
        Limits {
            chat_burst: u32::MAX,
            chat_interval: Duration::ZERO,
            global_burst: u32::MAX,
            global_interval: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::telegram()
    }
}

/// A token bucket: `tokens` as of `at`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token if one is there; otherwise how long until one is.
    fn take(
        slot: &mut Option<Bucket>,
        burst: u32,
        interval: Duration,
        jitter: Duration,
        now: Instant,
    ) -> Result<(), Duration> {
        if interval.is_zero() {
            return Ok(());
        }
        let cap = f64::from(burst.max(1));
        let b = slot.get_or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() / interval.as_secs_f64();
        b.tokens = (b.tokens + refill).min(cap);
        b.at = now;
        let slack = jitter.as_secs_f64() / interval.as_secs_f64();
        if b.tokens + slack >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(interval.mul_f64(1.0 - b.tokens))
        }
    }
}

/// One recorded API call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// Canonical Bot API name (`sendMessage`), whatever case the client used.
    pub method: String,
    /// All parameters as one JSON object.
    pub params: Value,
    /// The fault injected into this call, if any.
    pub fault: Option<Fault>,
    /// When it arrived, relative to server start.
    pub at: Duration,
}

/// An injectable error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 "Too Many Requests" with `parameters.retry_after`.
    RetryAfter(u32),
    /// 400 "message is not modified".
    NotModified,
    /// 400 with this description (prefix "Bad Request: " is added).
    BadRequest(String),
    /// 429 given by the rate limits ([`Limits`]), not injected.
    RateLimited(u32),
}

/// One message of a chat as the fake server knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub chat_id: i64,
    pub message_id: i32,
    /// Sender: the bot's id for bot messages.
    pub from_id: i64,
    pub from_bot: bool,
    /// Current text.
    pub text: String,
    /// Earlier texts, oldest first (one per successful edit).
    pub edits: Vec<String>,
    /// Current inline keyboard, as sent.
    pub reply_markup: Option<Value>,
    /// A document the bot sent (`sendDocument`).
    pub document: Option<Document>,
}

/// A document uploaded with `sendDocument`.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub file_name: String,
    pub bytes: Arc<Vec<u8>>,
}

impl ChatMessage {
    /// Every text this message ever had, oldest first, ending with the current one.
    pub fn history(&self) -> Vec<String> {
        let mut all = self.edits.clone();
        all.push(self.text.clone());
        all
    }

    /// The `callback_data` of every inline button of the message.
    pub fn button_data(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(rows) = self
            .reply_markup
            .as_ref()
            .and_then(|m| m.get("inline_keyboard"))
            .and_then(Value::as_array)
        {
            for row in rows {
                for b in row.as_array().into_iter().flatten() {
                    if let Some(d) = b.get("callback_data").and_then(Value::as_str) {
                        out.push(d.to_string());
                    }
                }
            }
        }
        out
    }
}

#[derive(Default)]
struct Inner {
    next_update_id: i64,
    next_message_id: i32,
    next_callback_id: u64,
    /// Updates not yet confirmed by an offset.
    pending: Vec<Value>,
    calls: Vec<Call>,
    counts: HashMap<String, usize>,
    /// (method lowercase, nth call 1-based) → fault.
    faults: HashMap<(String, usize), Fault>,
    messages: Vec<ChatMessage>,
    commands: Value,
    limits: Limits,
    chat_buckets: HashMap<i64, Option<Bucket>>,
    global_bucket: Option<Bucket>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Woken when an update is pushed (for long polls) and on every call (for waiters).
    changed: Notify,
    started: Instant,
}

/// A running fake Bot API server. Dropping it stops the server.
pub struct FakeBotApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeBotApi {
    /// Start a server on a free loopback port, with Telegram's rate limits.
    pub async fn start() -> std::io::Result<FakeBotApi> {
        Self::start_with(Limits::telegram()).await
    }

    /// Start a server on a free loopback port, with these rate limits.
    pub async fn start_with(limits: Limits) -> std::io::Result<FakeBotApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                next_update_id: 1,
                next_message_id: 1,
                commands: json!([]),
                limits,
                ..Inner::default()
            }),
            changed: Notify::new(),
            started: Instant::now(),
        });
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = served.await {
                tracing::warn!("fake bot api stopped: {e}");
            }
        });
        Ok(FakeBotApi {
            addr,
            shared,
            stop: Some(stop),
        })
    }

    /// Base URL to hand to `Bot::set_api_url` / `TELOXIDE_API_URL`, ending in `/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A user sends a text message in a private chat. Returns its message id.
    pub fn push_message(&self, user_id: i64, chat_id: i64, text: &str) -> i32 {
        let mut inner = self.shared.inner.lock().unwrap();
        let message_id = inner.next_message_id;
        inner.next_message_id += 1;
        let mut message = message_json(chat_id, message_id, &user_json(user_id), text, None);
        if text.starts_with('/') {
            let len = text.find(' ').unwrap_or(text.len());
            message["entities"] = json!([{"type": "bot_command", "offset": 0, "length": len}]);
        }
        inner.messages.push(ChatMessage {
            chat_id,
            message_id,
            from_id: user_id,
            from_bot: false,
            text: text.to_string(),
            edits: Vec::new(),
            reply_markup: None,
            document: None,
        });
        push_update(&mut inner, "message", message);
        drop(inner);
        self.shared.changed.notify_waiters();
        message_id
    }

    /// A user presses an inline button with `data` under the bot's message `message_id`.
    /// Returns the callback query id.
    pub fn push_callback(&self, user_id: i64, chat_id: i64, message_id: i32, data: &str) -> String {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.next_callback_id += 1;
        let id = format!("cb{}", inner.next_callback_id);
        let msg = inner
            .messages
            .iter()
            .find(|m| m.chat_id == chat_id && m.message_id == message_id)
            .cloned();
        let message = match msg {
            Some(m) => message_json(
                chat_id,
                message_id,
                &bot_user_json(),
                &m.text,
                m.reply_markup.clone(),
            ),
            None => message_json(chat_id, message_id, &bot_user_json(), "", None),
        };
        let query = json!({
            "id": id,
            "from": user_json(user_id),
            "message": message,
            "chat_instance": format!("ci{chat_id}"),
            "data": data,
        });
        push_update(&mut inner, "callback_query", query);
        drop(inner);
        self.shared.changed.notify_waiters();
        id
    }

    /// Answer the `nth` call (1-based, counted since start) of `method` with `fault`.
    pub fn fail_call(&self, method: &str, nth: usize, fault: Fault) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner
            .faults
            .insert((method.to_ascii_lowercase(), nth), fault);
    }

    /// Answer the next call of `method` with `fault`.
    pub fn fail_next_call(&self, method: &str, fault: Fault) {
        let mut inner = self.shared.inner.lock().unwrap();
        let key = method.to_ascii_lowercase();
        let nth = inner.counts.get(&key).copied().unwrap_or(0) + 1;
        inner.faults.insert((key, nth), fault);
    }

    /// Calls answered 429 by the rate limits (not by injected faults).
    pub fn rate_limited(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c.fault, Some(Fault::RateLimited(_))))
            .collect()
    }

    /// The text of the answer the bot gave to a callback query, if it answered it.
    pub fn callback_answer(&self, callback_id: &str) -> Option<String> {
        self.calls_of("answerCallbackQuery")
            .into_iter()
            .find(|c| {
                c.fault.is_none()
                    && !toast_too_long(&c.params)
                    && c.params["callback_query_id"] == callback_id
            })
            .map(|c| {
                c.params
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            })
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.inner.lock().unwrap().calls.clone()
    }

    /// Calls of one method (case-insensitive).
    pub fn calls_of(&self, method: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method))
            .collect()
    }

    /// Every message of a chat (user's and bot's), in order.
    pub fn transcript(&self, chat_id: i64) -> Vec<ChatMessage> {
        let inner = self.shared.inner.lock().unwrap();
        inner
            .messages
            .iter()
            .filter(|m| m.chat_id == chat_id)
            .cloned()
            .collect()
    }

    /// The bot's messages in a chat.
    pub fn bot_messages(&self, chat_id: i64) -> Vec<ChatMessage> {
        self.transcript(chat_id)
            .into_iter()
            .filter(|m| m.from_bot)
            .collect()
    }

    /// The transcript as readable text: `> user text`, `< bot text`, edits as `  ~ text`.
    pub fn transcript_text(&self, chat_id: i64) -> String {
        let mut out = String::new();
        for m in self.transcript(chat_id) {
            let history = m.history();
            let (first, rest) = history.split_first().expect("history has the current text");
            let arrow = if m.from_bot { "<" } else { ">" };
            out.push_str(&format!("{arrow} [{}] {}\n", m.message_id, indent(first)));
            for t in rest {
                out.push_str(&format!("  ~ edit: {}\n", indent(t)));
            }
            if let Some(d) = &m.document {
                out.push_str(&format!(
                    "  document: {} ({} bytes)\n",
                    d.file_name,
                    d.bytes.len()
                ));
            }
            let buttons = m.button_data();
            if !buttons.is_empty() {
                out.push_str(&format!("  buttons: {}\n", buttons.join(", ")));
            }
        }
        out
    }

    /// The command menu last set with `setMyCommands`.
    pub fn commands(&self) -> Value {
        self.shared.inner.lock().unwrap().commands.clone()
    }

    /// Wait until `check` returns `Some`, re-checking after every API call; `None` on timeout.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&FakeBotApi) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(v) = check(self) {
                return Some(v);
            }
            // The periodic wake-up covers changes made outside API calls (none today, but
            // cheap insurance against a missed notification).
            let tick = tokio::time::Instant::now() + Duration::from_millis(200);
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(tick.min(deadline)) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return check(self);
            }
        }
    }

    /// Wait for a bot message in `chat_id` whose current text contains `needle`.
    pub async fn wait_for_bot_text(
        &self,
        chat_id: i64,
        needle: &str,
        timeout: Duration,
    ) -> Option<ChatMessage> {
        self.wait_for(timeout, |api| {
            api.bot_messages(chat_id)
                .into_iter()
                .find(|m| m.text.contains(needle))
        })
        .await
    }
}

impl Drop for FakeBotApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn indent(s: &str) -> String {
    s.replace('\n', "\n    ")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn user_json(user_id: i64) -> Value {
    json!({"id": user_id, "is_bot": false, "first_name": format!("User{user_id}"),
           "username": format!("user{user_id}"), "language_code": "en"})
}

fn bot_user_json() -> Value {
    json!({"id": BOT_USER_ID, "is_bot": true, "first_name": "Storinator",
           "username": BOT_USERNAME})
}

fn message_json(
    chat_id: i64,
    message_id: i32,
    from: &Value,
    text: &str,
    reply_markup: Option<Value>,
) -> Value {
    let mut m = json!({
        "message_id": message_id,
        "date": unix_now(),
        "chat": {"id": chat_id, "type": "private", "first_name": format!("Chat{chat_id}")},
        "from": from,
        "text": text,
    });
    if let Some(markup) = reply_markup {
        m["reply_markup"] = markup;
    }
    m
}

fn push_update(inner: &mut Inner, kind: &str, payload: Value) {
    let id = inner.next_update_id;
    inner.next_update_id += 1;
    inner.pending.push(json!({"update_id": id, kind: payload}));
}

/// Telegram shows 0-200 characters of a callback answer's text and refuses a longer one.
fn toast_too_long(params: &Value) -> bool {
    params
        .get("text")
        .and_then(Value::as_str)
        .is_some_and(|t| t.encode_utf16().count() > 200)
}

const METHODS: &[&str] = &[
    "getMe",
    "getUpdates",
    "getWebhookInfo",
    "deleteWebhook",
    "sendMessage",
    "editMessageText",
    "editMessageReplyMarkup",
    "sendDocument",
    "answerCallbackQuery",
    "setMyCommands",
    "getMyCommands",
    "deleteMyCommands",
    "close",
    "logOut",
];

fn ok(result: Value) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"ok": true, "result": result})),
    )
        .into_response()
}

fn error(code: u16, description: &str, parameters: Option<Value>) -> Response {
    let mut body = json!({"ok": false, "error_code": code, "description": description});
    if let Some(p) = parameters {
        body["parameters"] = p;
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (status, axum::Json(body)).into_response()
}

fn bad_request(what: &str) -> Response {
    error(400, &format!("Bad Request: {what}"), None)
}

/// A file part of a multipart request.
struct Upload {
    field: String,
    file_name: String,
    bytes: Vec<u8>,
}

/// A JSON value from a form, query or multipart text value: numbers and objects arrive as
/// strings on the wire and are taken as such, the way the Bot API treats them.
fn wire_value(v: String) -> Value {
    serde_json::from_str(&v).unwrap_or(Value::String(v))
}

/// The fields of a multipart body: text fields as parameters, file fields as uploads.
async fn multipart(
    parts: Parts,
    body: Bytes,
    out: &mut serde_json::Map<String, Value>,
) -> Result<Vec<Upload>, String> {
    // The original request's parts carry the router's body-limit setting (disabled: the
    // handler caps the body itself).
    let req = Request::from_parts(parts, Body::from(body));
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| format!("bad multipart body: {e}"))?;
    let mut uploads = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| format!("bad multipart field: {e}"))?
    {
        let name = field.name().unwrap_or("").to_string();
        match field.file_name().map(str::to_string) {
            Some(file_name) => {
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| format!("bad multipart file {name}: {e}"))?;
                uploads.push(Upload {
                    field: name,
                    file_name,
                    bytes: bytes.to_vec(),
                });
            }
            None => {
                let text = field
                    .text()
                    .await
                    .map_err(|e| format!("bad multipart field {name}: {e}"))?;
                out.insert(name, wire_value(text));
            }
        }
    }
    Ok(uploads)
}

/// Parameters from the query string and the body (JSON, form or multipart) as one JSON
/// object, and the files of a multipart body.
async fn params(parts: Parts, body: Bytes) -> Result<(Value, Vec<Upload>), String> {
    let (uri, headers) = (&parts.uri, &parts.headers);
    let mut out = serde_json::Map::new();
    let add_pairs = |out: &mut serde_json::Map<String, Value>, pairs: Vec<(String, String)>| {
        for (k, v) in pairs {
            out.insert(k, wire_value(v));
        }
    };
    if let Some(q) = uri.query() {
        add_pairs(
            &mut out,
            serde_urlencoded::from_str(q).map_err(|e| format!("bad query string: {e}"))?,
        );
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut uploads = Vec::new();
    if !body.is_empty() {
        if ctype.starts_with("application/x-www-form-urlencoded") {
            add_pairs(
                &mut out,
                serde_urlencoded::from_bytes(&body).map_err(|e| format!("bad form: {e}"))?,
            );
        } else if ctype.starts_with("multipart/") {
            uploads = multipart(parts.clone(), body, &mut out).await?;
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(map)) => out.extend(map),
                Ok(Value::Null) => {}
                Ok(other) => return Err(format!("body is not a JSON object: {other}")),
                Err(e) => return Err(format!("bad JSON body: {e}")),
            }
        }
    }
    Ok((Value::Object(out), uploads))
}

fn too_large() -> Response {
    error(413, "Request Entity Too Large", None)
}

/// Checks the rate limits for a message to `chat_id`; the 429 answer when over them.
fn rate_check(inner: &mut Inner, chat_id: i64) -> Option<u32> {
    let now = Instant::now();
    let limits = inner.limits;
    let chat = inner.chat_buckets.entry(chat_id).or_default();
    // Peek the chat bucket without spending, so a global refusal does not cost the chat.
    let mut chat_probe = *chat;
    let chat_res = Bucket::take(
        &mut chat_probe,
        limits.chat_burst,
        limits.chat_interval,
        limits.jitter,
        now,
    );
    let mut global_probe = inner.global_bucket;
    let global_res = Bucket::take(
        &mut global_probe,
        limits.global_burst,
        limits.global_interval,
        limits.jitter,
        now,
    );
    match (chat_res, global_res) {
        (Ok(()), Ok(())) => {
            *inner
                .chat_buckets
                .get_mut(&chat_id)
                .expect("inserted above") = chat_probe;
            inner.global_bucket = global_probe;
            None
        }
        (Err(wait), _) | (_, Err(wait)) => Some(wait.as_secs_f64().ceil().max(1.0) as u32),
    }
}

/// Telegram refuses inline buttons whose `callback_data` is empty or over 64 bytes: the
/// refusal, if any.
fn check_markup(markup: &Option<Value>) -> Option<Response> {
    let rows = markup
        .as_ref()
        .and_then(|m| m.get("inline_keyboard"))
        .and_then(Value::as_array);
    for row in rows.into_iter().flatten() {
        for b in row.as_array().into_iter().flatten() {
            if let Some(d) = b.get("callback_data") {
                let len = d.as_str().map(str::len).unwrap_or(0);
                if len == 0 || len > MAX_CALLBACK_DATA {
                    return Some(bad_request("BUTTON_DATA_INVALID"));
                }
            }
        }
    }
    None
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request<Body>) -> Response {
    let (head, body) = req.into_parts();
    let uri = head.uri.clone();
    // The body is read with a cap a little over the upload limit (multipart framing), so an
    // oversized document is refused the way the Bot API refuses it, without buffering it all.
    let body = match axum::body::to_bytes(body, (MAX_UPLOAD + (1 << 20)) as usize).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    // Path: /bot<token>/<method>
    let mut parts = uri.path().trim_start_matches('/').splitn(2, '/');
    let (Some(token), Some(method)) = (parts.next(), parts.next()) else {
        return error(404, "Not Found", None);
    };
    if !token.starts_with("bot") || token.len() <= 3 {
        return error(404, "Not Found", None);
    }
    let method = METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .map(|m| m.to_string())
        .unwrap_or_else(|| method.to_string());
    let (params, uploads) = match params(head, body).await {
        Ok(p) => p,
        Err(e) => return bad_request(&e),
    };
    let key = method.to_ascii_lowercase();

    let fault = {
        let mut inner = shared.inner.lock().unwrap();
        let n = {
            let c = inner.counts.entry(key.clone()).or_insert(0);
            *c += 1;
            *c
        };
        let mut fault = inner.faults.remove(&(key.clone(), n));
        if fault.is_none() && MESSAGE_METHODS.contains(&key.as_str()) {
            let chat = int_param(&params, "chat_id").unwrap_or(0);
            fault = rate_check(&mut inner, chat).map(Fault::RateLimited);
        }
        let at = shared.started.elapsed();
        inner.calls.push(Call {
            method: method.clone(),
            params: params.clone(),
            fault: fault.clone(),
            at,
        });
        fault
    };
    shared.changed.notify_waiters();
    if let Some(fault) = fault {
        return match fault {
            Fault::RetryAfter(s) | Fault::RateLimited(s) => error(
                429,
                &format!("Too Many Requests: retry after {s}"),
                Some(json!({"retry_after": s})),
            ),
            Fault::NotModified => error(400, NOT_MODIFIED, None),
            Fault::BadRequest(d) => bad_request(&d),
        };
    }

    let response = match key.as_str() {
        "getme" => ok(json!({
            "id": BOT_USER_ID, "is_bot": true, "first_name": "Storinator",
            "username": BOT_USERNAME, "can_join_groups": true,
            "can_read_all_group_messages": false, "supports_inline_queries": false,
            "can_connect_to_business": false, "has_main_web_app": false,
        })),
        "getwebhookinfo" => ok(json!({
            "url": "", "has_custom_certificate": false, "pending_update_count": 0,
        })),
        "deletewebhook" | "close" | "logout" => ok(json!(true)),
        "getupdates" => return get_updates(&shared, &params).await,
        "sendmessage" => send_message(&shared, &params),
        "editmessagetext" | "editmessagereplymarkup" => {
            edit_message(&shared, &params, key == "editmessagetext")
        }
        "senddocument" => send_document(&shared, &params, uploads),
        "answercallbackquery" => match params.get("callback_query_id") {
            // Telegram takes 0-200 characters of toast; a longer one is refused outright.
            Some(_) if toast_too_long(&params) => bad_request("MESSAGE_TOO_LONG"),
            Some(_) => ok(json!(true)),
            None => bad_request("callback_query_id is required"),
        },
        "setmycommands" => match params.get("commands") {
            Some(c @ Value::Array(_)) => {
                shared.inner.lock().unwrap().commands = c.clone();
                ok(json!(true))
            }
            _ => bad_request("commands must be an array"),
        },
        "getmycommands" => ok(shared.inner.lock().unwrap().commands.clone()),
        "deletemycommands" => {
            shared.inner.lock().unwrap().commands = json!([]);
            ok(json!(true))
        }
        _ => error(404, "Not Found: method not found", None),
    };
    shared.changed.notify_waiters();
    response
}

fn int_param(params: &Value, name: &str) -> Option<i64> {
    match params.get(name)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn markup_param(params: &Value) -> Option<Value> {
    match params.get("reply_markup")? {
        Value::String(s) => serde_json::from_str(s).ok(),
        Value::Null => None,
        v => Some(v.clone()),
    }
}

async fn get_updates(shared: &Arc<Shared>, params: &Value) -> Response {
    let offset = int_param(params, "offset").unwrap_or(0);
    let limit = int_param(params, "limit").unwrap_or(100).clamp(1, 100) as usize;
    let timeout = Duration::from_secs(int_param(params, "timeout").unwrap_or(0).max(0) as u64);
    let deadline = tokio::time::Instant::now() + timeout.min(MAX_POLL);
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut inner = shared.inner.lock().unwrap();
            // An offset confirms every update below it, as in the real API.
            inner
                .pending
                .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
            if !inner.pending.is_empty() {
                let batch: Vec<Value> = inner.pending.iter().take(limit).cloned().collect();
                return ok(Value::Array(batch));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return ok(json!([]));
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn send_message(shared: &Arc<Shared>, params: &Value) -> Response {
    let Some(chat_id) = int_param(params, "chat_id") else {
        return bad_request("chat_id is required");
    };
    let Some(text) = params.get("text").and_then(Value::as_str) else {
        return bad_request("text is required");
    };
    if text.trim().is_empty() {
        return bad_request("message text is empty");
    }
    if text.chars().count() > 4096 {
        return bad_request("message is too long");
    }
    let markup = markup_param(params);
    if let Some(refused) = check_markup(&markup) {
        return refused;
    }
    let mut inner = shared.inner.lock().unwrap();
    let message_id = inner.next_message_id;
    inner.next_message_id += 1;
    inner.messages.push(ChatMessage {
        chat_id,
        message_id,
        from_id: BOT_USER_ID,
        from_bot: true,
        text: text.to_string(),
        edits: Vec::new(),
        reply_markup: markup.clone(),
        document: None,
    });
    ok(message_json(
        chat_id,
        message_id,
        &bot_user_json(),
        text,
        markup,
    ))
}

fn send_document(shared: &Arc<Shared>, params: &Value, uploads: Vec<Upload>) -> Response {
    let Some(chat_id) = int_param(params, "chat_id") else {
        return bad_request("chat_id is required");
    };
    // The file comes as the `document` part, or as another part that `document` names as
    // `attach://<part>` (teloxide's way).
    let part = match params.get("document").and_then(Value::as_str) {
        Some(d) if d.starts_with("attach://") => d["attach://".len()..].to_string(),
        _ => "document".to_string(),
    };
    let Some(upload) = uploads.into_iter().find(|u| u.field == part) else {
        // A file id or URL names a file this server never saw.
        return match params.get("document") {
            Some(_) => bad_request("wrong file identifier/HTTP URL specified"),
            None => bad_request("there is no document in the request"),
        };
    };
    if upload.bytes.len() as u64 > MAX_UPLOAD {
        return too_large();
    }
    if upload.bytes.is_empty() {
        return bad_request("file must be non-empty");
    }
    let caption = params
        .get("caption")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if caption.chars().count() > 1024 {
        return bad_request("message caption is too long");
    }
    let markup = markup_param(params);
    if let Some(refused) = check_markup(&markup) {
        return refused;
    }
    let mut inner = shared.inner.lock().unwrap();
    let message_id = inner.next_message_id;
    inner.next_message_id += 1;
    let size = upload.bytes.len();
    let file_name = upload.file_name.clone();
    inner.messages.push(ChatMessage {
        chat_id,
        message_id,
        from_id: BOT_USER_ID,
        from_bot: true,
        text: caption.clone(),
        edits: Vec::new(),
        reply_markup: markup.clone(),
        document: Some(Document {
            file_name: upload.file_name,
            bytes: Arc::new(upload.bytes),
        }),
    });
    let mut m = message_json(chat_id, message_id, &bot_user_json(), "", markup);
    m.as_object_mut()
        .expect("message is an object")
        .remove("text");
    m["caption"] = json!(caption);
    m["document"] = json!({
        "file_name": file_name,
        "mime_type": "application/octet-stream",
        "file_id": format!("doc{message_id}"),
        "file_unique_id": format!("u{message_id}"),
        "file_size": size,
    });
    ok(m)
}

/// `editMessageText` (`with_text`) or `editMessageReplyMarkup`.
fn edit_message(shared: &Arc<Shared>, params: &Value, with_text: bool) -> Response {
    let (Some(chat_id), Some(message_id)) = (
        int_param(params, "chat_id"),
        int_param(params, "message_id"),
    ) else {
        return bad_request("chat_id and message_id are required");
    };
    let text = params.get("text").and_then(Value::as_str);
    if with_text {
        match text {
            None => return bad_request("text is required"),
            Some(t) if t.trim().is_empty() => return bad_request("message text is empty"),
            Some(t) if t.chars().count() > 4096 => return bad_request("message is too long"),
            Some(_) => {}
        }
    }
    let markup = markup_param(params);
    if let Some(refused) = check_markup(&markup) {
        return refused;
    }
    let mut inner = shared.inner.lock().unwrap();
    let Some(m) = inner
        .messages
        .iter_mut()
        .find(|m| m.chat_id == chat_id && m.message_id == message_id as i32)
    else {
        return bad_request("message to edit not found");
    };
    if !m.from_bot {
        return bad_request("message can't be edited");
    }
    let text = text.unwrap_or(&m.text).to_string();
    if m.text == text && m.reply_markup == markup {
        return error(400, NOT_MODIFIED, None);
    }
    let old = std::mem::replace(&mut m.text, text.clone());
    m.edits.push(old);
    m.reply_markup = markup.clone();
    ok(message_json(
        chat_id,
        message_id as i32,
        &bot_user_json(),
        &text,
        markup,
    ))
}

#[cfg(test)]
mod tests;
