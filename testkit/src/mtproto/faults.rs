//! Scripted faults and call counters: what tests inject and what they read back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Methods Telegram meters as message-level calls (about 100 per minute per account).
pub const MESSAGE_CLASS: &[&str] = &[
    "messages.sendMedia",
    "messages.getHistory",
    "messages.getMessages",
    "messages.search",
    "messages.deleteMessages",
    "messages.getDialogs",
    "channels.deleteMessages",
    "channels.getMessages",
];

/// What an injected fault does to the call it hits.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this rpc_error instead of running the method.
    RpcError { code: i32, message: String },
    /// Run the method after sleeping this long.
    Delay(Duration),
    /// Never answer this call (the connection stays up).
    Hang,
    /// Close the TCP connection instead of answering.
    DropConnection,
    /// Run the method, then close the connection before the answer goes out: the call took
    /// effect but the client never learns it (a lost answer).
    LoseAnswer,
    /// Run the method but flip one byte in every 512 of the returned file data (upload.getFile
    /// only), so any range the client keeps is damaged.
    CorruptDownload,
    /// Store the part with one byte flipped, as a client whose file changed under it would
    /// (upload.saveFilePart / saveBigFilePart only): the md5_checksum of the send then fails.
    CorruptUpload,
    /// Answer upload.getFile with upload.fileCdnRedirect whatever the request's
    /// `cdn_supported` says (a server that does not follow the protocol).
    CdnRedirect,
}

impl Fault {
    pub fn rpc(code: i32, message: impl Into<String>) -> Self {
        Fault::RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn flood_wait(seconds: u32) -> Self {
        Fault::rpc(420, format!("FLOOD_WAIT_{seconds}"))
    }
    pub fn flood_premium_wait(seconds: u32) -> Self {
        Fault::rpc(420, format!("FLOOD_PREMIUM_WAIT_{seconds}"))
    }
}

#[derive(Debug)]
struct Rule {
    method: String,
    /// Absolute call numbers (per method, 1-based) this rule hits: [first, first+count).
    window: Option<(u64, u64)>,
    probability: f64,
    remaining: u32,
    fault: Fault,
}

/// Scripted faults. Rules are matched in insertion order; the first that applies wins.
#[derive(Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    rng: Mutex<u64>,
    pub(crate) counters: Arc<Counters>,
    fired: Mutex<Vec<Fired>>,
}

/// A fault the server served: which call of which method it hit.
#[derive(Clone, Debug)]
pub struct Fired {
    pub method: String,
    /// The call's number among all calls of `method` (1-based, since the server started).
    pub call: u64,
    pub fault: Fault,
}

impl Faults {
    /// Faults that count calls with `counters`.
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        Faults {
            counters,
            ..Faults::default()
        }
    }

    /// Hit the `nth` call (1 = the next one) of `method` counted from now.
    pub fn on_call(&self, method: &str, nth: u64, fault: Fault) {
        self.on_calls(method, nth, 1, fault)
    }

    /// Hit `count` consecutive calls of `method` starting with the `nth` from now.
    pub fn on_calls(&self, method: &str, nth: u64, count: u64, fault: Fault) {
        let base = self.counters.get(method);
        self.rules.lock().unwrap().push(Rule {
            method: method.into(),
            window: Some((base + nth.max(1), count)),
            probability: 1.0,
            remaining: u32::MAX,
            fault,
        });
    }

    /// Hit each call of `method` (`"*"` = any) with probability `p`, at most `max_times`.
    pub fn with_probability(&self, method: &str, p: f64, max_times: u32, fault: Fault) {
        self.rules.lock().unwrap().push(Rule {
            method: method.into(),
            window: None,
            probability: p,
            remaining: max_times,
            fault,
        });
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Every fault served so far, in order. A test that scripts a fault checks here that it
    /// really fired (a rule on a method the client never calls proves nothing).
    pub fn fired(&self) -> Vec<Fired> {
        self.fired.lock().unwrap().clone()
    }

    /// How many faults were served on `method`.
    pub fn fired_on(&self, method: &str) -> usize {
        self.fired
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.method == method)
            .count()
    }

    /// Decides the fault for call number `n` of `method`.
    pub(crate) fn pick(&self, method: &str, n: u64) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if rule.remaining == 0 || (rule.method != "*" && rule.method != method) {
                continue;
            }
            if let Some((first, count)) = rule.window
                && !(n >= first && n < first + count)
            {
                continue;
            }
            if rule.probability < 1.0 && self.next_f64() >= rule.probability {
                continue;
            }
            rule.remaining -= 1;
            self.fired.lock().unwrap().push(Fired {
                method: method.to_string(),
                call: n,
                fault: rule.fault.clone(),
            });
            return Some(rule.fault.clone());
        }
        None
    }

    fn next_f64(&self) -> f64 {
        let mut s = self.rng.lock().unwrap();
        super::net::xorshift_f64(&mut s)
    }
}

/// Calls received, by TL method name (e.g. `messages.sendMedia`), plus `connections`,
/// `ping`, `gzip:<method>` for calls that arrived gzip_packed, `dc<N>:<method>` for calls
/// served by data centre N, `layer:<N>` for each invokeWithLayer, and the session-level
/// events `bad_server_salt`, `bad_msg_notification`, `new_session_created`,
/// `get_future_salts`.
#[derive(Default, Debug)]
pub struct Counters {
    map: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Increments and returns the new count.
    pub(crate) fn bump(&self, method: &str) -> u64 {
        let mut m = self.map.lock().unwrap();
        let c = m.entry(method.to_string()).or_insert(0);
        *c += 1;
        *c
    }
    pub fn get(&self, method: &str) -> u64 {
        self.map.lock().unwrap().get(method).copied().unwrap_or(0)
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.map.lock().unwrap().clone()
    }
    /// Sum over the message-class methods.
    pub fn message_class_calls(&self) -> u64 {
        let m = self.map.lock().unwrap();
        MESSAGE_CLASS
            .iter()
            .map(|k| m.get(*k).copied().unwrap_or(0))
            .sum()
    }
}
