//! The server salts each data centre's authorization key is known to accept, so a new part
//! connection can start under a good salt.
//!
//! Every MTProto message carries a server salt. A connection that does not know one sends its
//! first message under salt 0, the server refuses it with `bad_server_salt` naming the right
//! one, and only then can parts go: a round trip lost per connection, over a far link 100 ms
//! or more, before each of the several connections a transfer opens can carry anything. But
//! "a server salt is attached to the authorization key rather than being session-specific"
//! (core.telegram.org/mtproto/service_messages, get_future_salts): the salts one connection
//! learns serve every connection under the same key, and Telegram's own clients keep them for
//! their next connections. So the storage asks each data centre for its coming salts
//! (`get_future_salts`) beside a call it makes anyway, and part connections start with the
//! one valid now. A salt that turns out stale costs what it cost before (the refusal names the
//! right one and the parts are sent again) and drops the data centre's salts, so the next
//! connections probe until they are fetched again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use grammers_tl_types as tl;

/// A salt is used only while it stays valid at least this much longer (a connection's first
/// messages must arrive under it; the server accepts a salt a while past its end anyway).
const MARGIN: Duration = Duration::from_secs(60);

/// How many coming salts to ask for (Telegram gives at most 64; each lasts about an hour).
pub(super) const ASK_FOR: i32 = 32;

/// The coming salts of one data centre, with the server's clock when they were given.
struct Known {
    salts: Vec<tl::types::FutureSalt>,
    /// The server's `now` in the answer, and when that answer arrived here.
    server_now: i64,
    at: Instant,
}

/// Known salts by data centre.
#[derive(Default)]
pub(super) struct SaltBook {
    by_dc: Mutex<HashMap<i32, Known>>,
}

impl SaltBook {
    /// Records the answer to a get_future_salts sent to `dc`.
    pub(super) fn learn(&self, dc: i32, answer: tl::enums::FutureSalts) {
        let tl::enums::FutureSalts::Salts(s) = answer;
        self.learn_at(dc, s.salts.0, i64::from(s.now), Instant::now());
    }

    fn learn_at(&self, dc: i32, salts: Vec<tl::types::FutureSalt>, server_now: i64, at: Instant) {
        let known = Known {
            salts,
            server_now,
            at,
        };
        self.by_dc.lock().unwrap().insert(dc, known);
    }

    /// A salt of `dc` valid now and for a while yet, if one is known.
    pub(super) fn current(&self, dc: i32) -> Option<i64> {
        self.current_at(dc, Instant::now())
    }

    fn current_at(&self, dc: i32, now: Instant) -> Option<i64> {
        let by_dc = self.by_dc.lock().unwrap();
        let known = by_dc.get(&dc)?;
        // The server's clock now, by its own word plus the time since it said it.
        let t = known.server_now + now.saturating_duration_since(known.at).as_secs() as i64;
        let margin = MARGIN.as_secs() as i64;
        known
            .salts
            .iter()
            .filter(|s| i64::from(s.valid_since) <= t && t + margin < i64::from(s.valid_until))
            // The newest of those valid: it stays valid longest.
            .max_by_key(|s| s.valid_since)
            .map(|s| s.salt)
    }

    /// `dc` refused a salt from this book: forget its salts until they are fetched again.
    pub(super) fn forget(&self, dc: i32) {
        self.by_dc.lock().unwrap().remove(&dc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salt(since: i32, until: i32, salt: i64) -> tl::types::FutureSalt {
        tl::types::FutureSalt {
            valid_since: since,
            valid_until: until,
            salt,
        }
    }

    #[test]
    fn the_salt_valid_now_is_picked_by_the_servers_clock() {
        let book = SaltBook::default();
        let t0 = Instant::now();
        // Overlapping hour-long salts every half hour, the server's clock at 1,000.
        let salts = vec![salt(0, 3600, 1), salt(1800, 5400, 2), salt(3600, 7200, 3)];
        book.learn_at(2, salts, 1000, t0);
        assert_eq!(
            book.current_at(2, t0),
            Some(1),
            "only the first is valid yet"
        );
        // At 1,900 the second has begun and outlasts the first.
        assert_eq!(book.current_at(2, t0 + Duration::from_secs(900)), Some(2));
        // At 5,380 the second ends within the margin: the third.
        assert_eq!(book.current_at(2, t0 + Duration::from_secs(4380)), Some(3));
        // Past the last one: nothing, the connection probes.
        assert_eq!(book.current_at(2, t0 + Duration::from_secs(7000)), None);
        assert_eq!(
            book.current_at(4, t0),
            None,
            "another data centre's are not known"
        );
    }

    #[test]
    fn a_refused_salt_drops_the_data_centres_salts() {
        let book = SaltBook::default();
        let t0 = Instant::now();
        book.learn_at(2, vec![salt(0, 3600, 7)], 10, t0);
        book.learn_at(4, vec![salt(0, 3600, 9)], 10, t0);
        book.forget(2);
        assert_eq!(book.current_at(2, t0), None);
        assert_eq!(book.current_at(4, t0), Some(9));
    }
}
