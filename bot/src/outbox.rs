//! Everything the bot sends goes through one queue that keeps Telegram's message limits:
//! about one message per second in a chat (short bursts allowed) and about thirty per second
//! overall, edits and documents included. A 429 pauses its chat for exactly `retry_after` and
//! the message is sent again, as often as it takes; a job's final message is never dropped.
//!
//! One task owns the queue: per chat a FIFO of messages (one call in flight per chat, so a
//! chat sees its messages in order), a token bucket per chat and one for the bot. Chats take
//! turns, so a busy chat can't starve the others. An edit of a message that already has an
//! edit waiting replaces it: only the newest progress is worth a call.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use teloxide::ApiError;
use teloxide::RequestError;
use teloxide::payloads::{EditMessageTextSetters, SendDocumentSetters, SendMessageSetters};
use teloxide::prelude::*;
use teloxide::types::{InlineKeyboardMarkup, InputFile, MessageId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The rates the bot keeps to, as token buckets: `chat_burst` messages at once in a chat, then
/// one per `chat_interval`; `global_burst` at once overall, then one per `global_interval`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub chat_burst: u32,
    pub chat_interval: Duration,
    pub global_burst: u32,
    pub global_interval: Duration,
}

impl Limits {
    /// Under Telegram's "about one per second per chat, about 30 per second overall": the
    /// bot paces when it sends, not when a message arrives, so it keeps a margin for the
    /// network's jitter; aiming exactly at a fuzzy limit would meet it now and then.
    pub fn telegram() -> Limits {
        Limits {
            chat_burst: 3,
            chat_interval: Duration::from_millis(1500),
            global_burst: 30,
            global_interval: Duration::from_secs(1) / 25,
        }
    }

    /// The same limits `factor` times faster (tests).
    pub fn faster(self, factor: u32) -> Limits {
        Limits {
            chat_interval: self.chat_interval / factor,
            global_interval: self.global_interval / factor,
            ..self
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::telegram()
    }
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    fn refill(&mut self, burst: u32, interval: Duration, now: Instant) {
        if interval.is_zero() {
            self.tokens = f64::from(burst.max(1));
        } else {
            let gained =
                now.saturating_duration_since(self.at).as_secs_f64() / interval.as_secs_f64();
            self.tokens = (self.tokens + gained).min(f64::from(burst.max(1)));
        }
        self.at = now;
    }

    /// When the next token is there (now if one is).
    fn ready_at(&self, interval: Duration) -> Instant {
        if self.tokens >= 1.0 {
            self.at
        } else {
            self.at + interval.mul_f64(1.0 - self.tokens)
        }
    }
}

/// What to send.
#[derive(Clone, Debug)]
pub enum Out {
    Text {
        text: String,
        markup: Option<InlineKeyboardMarkup>,
    },
    /// Replace a message's text (and its buttons: `None` removes them).
    Edit {
        message: MessageId,
        text: String,
        markup: Option<InlineKeyboardMarkup>,
    },
    Document {
        path: PathBuf,
        name: String,
        caption: String,
    },
}

/// How hard to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Network failures are retried a few times, then reported.
    Normal,
    /// Retried until delivered or refused for good (a job's final message).
    Final,
}

/// The answer to a queued message: the message as sent, or `None` for an edit superseded by a
/// newer one or one Telegram found not modified.
pub type Delivery = Result<Option<Message>, RequestError>;

struct Item {
    op: Out,
    persistence: Persistence,
    reply: Vec<oneshot::Sender<Delivery>>,
    failures: u32,
}

struct Queued {
    chat: ChatId,
    item: Item,
}

/// The sending half, cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Outbox {
    /// Starts the queue's task; it ends when every [`Outbox`] is dropped and the queue is
    /// empty.
    pub fn start(bot: Bot, limits: Limits) -> Outbox {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Runner::new(bot, limits).run(rx));
        Outbox { tx }
    }

    /// Queues `op` for `chat`; resolves once it was sent (or finally refused).
    pub fn send(
        &self,
        chat: ChatId,
        op: Out,
        persistence: Persistence,
    ) -> impl Future<Output = Delivery> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            chat,
            item: Item {
                op,
                persistence,
                reply: vec![reply],
                failures: 0,
            },
        };
        let sent = self.tx.send(queued).is_ok();
        async move {
            if !sent {
                return Err(RequestError::Io(
                    std::io::Error::other("the bot is stopping").into(),
                ));
            }
            answer.await.unwrap_or_else(|_| {
                Err(RequestError::Io(
                    std::io::Error::other("the bot is stopping").into(),
                ))
            })
        }
    }

    /// A text message.
    pub async fn text(
        &self,
        chat: ChatId,
        text: impl Into<String>,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Result<Message, RequestError> {
        let op = Out::Text {
            text: crate::clip(text.into()),
            markup,
        };
        match self.send(chat, op, Persistence::Normal).await? {
            Some(m) => Ok(m),
            None => Err(RequestError::Io(
                std::io::Error::other("a new message was not sent").into(),
            )),
        }
    }

    /// An edit; "not modified" counts as done.
    pub async fn edit(
        &self,
        chat: ChatId,
        message: MessageId,
        text: impl Into<String>,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Result<(), RequestError> {
        let op = Out::Edit {
            message,
            text: crate::clip(text.into()),
            markup,
        };
        self.send(chat, op, Persistence::Normal).await.map(|_| ())
    }
}

#[derive(Default)]
struct ChatQueue {
    items: VecDeque<Item>,
    in_flight: bool,
    blocked_until: Option<Instant>,
    bucket: Option<Bucket>,
}

struct Runner {
    bot: Bot,
    limits: Limits,
    chats: HashMap<ChatId, ChatQueue>,
    /// Chats in the order they get their turn.
    turns: VecDeque<ChatId>,
    global: Option<Bucket>,
}

/// A finished call, back to the runner.
struct Done {
    chat: ChatId,
    item: Item,
    result: Delivery,
}

/// Longest pause after a network failure.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Network failures a normal message survives.
const NORMAL_ATTEMPTS: u32 = 3;

impl Runner {
    fn new(bot: Bot, limits: Limits) -> Runner {
        Runner {
            bot,
            limits,
            chats: HashMap::new(),
            turns: VecDeque::new(),
            global: None,
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut open = true;
        loop {
            let next = self.dispatch(&done_tx);
            if !open
                && self
                    .chats
                    .values()
                    .all(|c| c.items.is_empty() && !c.in_flight)
            {
                return;
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                q = rx.recv(), if open => match q {
                    Some(q) => self.enqueue(q),
                    None => open = false,
                },
                Some(d) = done_rx.recv() => self.finished(d),
                _ = sleep => {}
            }
            if self.chats.len() > 1000 {
                self.forget_idle();
            }
        }
    }

    fn enqueue(&mut self, q: Queued) {
        let chat = self.chats.entry(q.chat).or_default();
        if let Out::Edit { message, .. } = &q.item.op {
            // A waiting edit of the same message is replaced (not the one in flight, which is
            // not in the queue).
            let waiting = chat
                .items
                .iter_mut()
                .skip(usize::from(chat.in_flight))
                .find(|i| matches!(&i.op, Out::Edit { message: m, .. } if m == message));
            if let Some(old) = waiting {
                old.op = q.item.op;
                if q.item.persistence == Persistence::Final {
                    old.persistence = Persistence::Final;
                }
                // The replaced edit's waiters learn the outcome of the newer one.
                old.reply.extend(q.item.reply);
                return;
            }
        }
        chat.items.push_back(q.item);
        if !self.turns.contains(&q.chat) {
            self.turns.push_back(q.chat);
        }
    }

    /// Starts every call the limits allow now; returns when to look again.
    fn dispatch(&mut self, done: &mpsc::UnboundedSender<Done>) -> Option<Instant> {
        let now = Instant::now();
        let l = self.limits;
        let mut wake: Option<Instant> = None;
        let mut earliest = |t: Instant| {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        };
        let mut rounds = self.turns.len();
        while rounds > 0 {
            rounds -= 1;
            let Some(chat_id) = self.turns.pop_front() else {
                break;
            };
            let q = self
                .chats
                .get_mut(&chat_id)
                .expect("a chat in turns has a queue");
            if q.items.is_empty() {
                // Out of turns; the queue (and its bucket) stays until it is idle and full.
                continue;
            }
            self.turns.push_back(chat_id);
            if q.in_flight {
                continue;
            }
            if let Some(t) = q.blocked_until.filter(|t| *t > now) {
                earliest(t);
                continue;
            }
            let bucket = q
                .bucket
                .get_or_insert_with(|| Bucket::full(l.chat_burst, now));
            bucket.refill(l.chat_burst, l.chat_interval, now);
            if bucket.tokens < 1.0 {
                earliest(bucket.ready_at(l.chat_interval));
                continue;
            }
            let global = self
                .global
                .get_or_insert_with(|| Bucket::full(l.global_burst, now));
            global.refill(l.global_burst, l.global_interval, now);
            if global.tokens < 1.0 {
                earliest(global.ready_at(l.global_interval));
                // Nobody else can go either; this chat keeps its place at the front.
                self.turns.rotate_right(1);
                break;
            }
            global.tokens -= 1.0;
            bucket.tokens -= 1.0;
            q.in_flight = true;
            let item = q.items.pop_front().expect("checked non-empty");
            let (bot, done) = (self.bot.clone(), done.clone());
            tokio::spawn(async move {
                let result = call(&bot, chat_id, &item.op).await;
                let _ = done.send(Done {
                    chat: chat_id,
                    item,
                    result,
                });
            });
        }
        wake
    }

    /// Forgets idle chats whose bucket is full again (their state is the default then).
    fn forget_idle(&mut self) {
        let now = Instant::now();
        let l = self.limits;
        let turns = &self.turns;
        self.chats.retain(|id, q| {
            if !q.items.is_empty() || q.in_flight || turns.contains(id) {
                return true;
            }
            if q.blocked_until.is_some_and(|t| t > now) {
                return true;
            }
            match &mut q.bucket {
                Some(b) => {
                    b.refill(l.chat_burst, l.chat_interval, now);
                    b.tokens < f64::from(l.chat_burst.max(1))
                }
                None => false,
            }
        });
    }

    fn finished(&mut self, d: Done) {
        let Done {
            chat,
            mut item,
            result,
        } = d;
        let q = self.chats.entry(chat).or_default();
        q.in_flight = false;
        let retry_in = match &result {
            Err(RequestError::RetryAfter(s)) => {
                tracing::info!(chat = chat.0, "telegram asked to wait {:?}", s.duration());
                Some(s.duration())
            }
            Err(e) if is_transient(e) => {
                item.failures += 1;
                let again =
                    item.persistence == Persistence::Final || item.failures < NORMAL_ATTEMPTS;
                tracing::warn!(
                    chat = chat.0,
                    failures = item.failures,
                    "sending failed: {e}"
                );
                again.then(|| {
                    (Duration::from_millis(500) * 2u32.saturating_pow(item.failures - 1))
                        .min(MAX_BACKOFF)
                })
            }
            _ => None,
        };
        match retry_in {
            Some(wait) => {
                q.blocked_until = Some(Instant::now() + wait);
                q.items.push_front(item);
                if !self.turns.contains(&chat) {
                    self.turns.push_back(chat);
                }
            }
            None => {
                if let Err(e) = &result {
                    tracing::warn!(chat = chat.0, "telegram refused a message: {e}");
                }
                let mut result = Some(result);
                let n = item.reply.len();
                for (i, r) in item.reply.into_iter().enumerate() {
                    let answer = if i + 1 == n {
                        result.take().expect("taken once")
                    } else {
                        copy(result.as_ref().expect("still there"))
                    };
                    let _ = r.send(answer);
                }
            }
        }
    }
}

/// Errors worth sending again: the network, not Telegram's verdict.
fn is_transient(e: &RequestError) -> bool {
    matches!(e, RequestError::Network(_) | RequestError::Io(_))
}

/// A result for one more waiter (`RequestError` is not `Clone`).
fn copy(d: &Delivery) -> Delivery {
    match d {
        Ok(m) => Ok(m.clone()),
        Err(e) => Err(RequestError::Io(
            std::io::Error::other(e.to_string()).into(),
        )),
    }
}

async fn call(bot: &Bot, chat: ChatId, op: &Out) -> Delivery {
    match op {
        Out::Text { text, markup } => {
            let mut req = bot.send_message(chat, text.clone());
            if let Some(m) = markup {
                req = req.reply_markup(m.clone());
            }
            req.await.map(Some)
        }
        Out::Edit {
            message,
            text,
            markup,
        } => {
            let markup = markup
                .clone()
                .unwrap_or_else(|| InlineKeyboardMarkup::new(Vec::<Vec<_>>::new()));
            match bot
                .edit_message_text(chat, *message, text.clone())
                .reply_markup(markup)
                .await
            {
                Ok(m) => Ok(Some(m)),
                Err(RequestError::Api(ApiError::MessageNotModified)) => Ok(None),
                Err(e) => Err(e),
            }
        }
        Out::Document {
            path,
            name,
            caption,
        } => bot
            .send_document(chat, InputFile::file(path.clone()).file_name(name.clone()))
            .caption(caption.clone())
            .await
            .map(Some),
    }
}
