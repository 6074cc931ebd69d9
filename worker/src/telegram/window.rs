//! The window of part transfers in flight, shared by every upload and read of a storage.
//!
//! Throughput over a link is what is in flight divided by the round trip: one 512 KiB part at
//! a time over 100 ms is 5 MB/s whatever the bandwidth. The window keeps enough parts in
//! flight to fill the link and adapts the way TCP does: it starts at what Telegram Desktop
//! keeps in flight at most (8 MiB), grows by one part per
//! part answered until the first trouble (doubling every round trip), then by one part per
//! window's worth of answers; a FLOOD_WAIT, a timeout or a lost connection halves it, once per
//! round trip however many parts the same trouble hit. It never exceeds its bound
//! (`STORINATOR_PART_CONCURRENCY`) nor goes below one part.
//!
//! Room goes to the parts waiting in their order: a transfer takes a place in line when it
//! starts ([`Window::order`]) and each of its parts waits behind every part of the transfers
//! that started before it. A restore uses its ranges in the order it asked for them, so the
//! first range must not starve behind later ones: handing room to whichever waiter wakes
//! first let the later ranges finish while the first one still had parts to send, and the
//! window drained while the restore waited for it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Parts in flight before anything is known about the link: 8 MiB, what Telegram Desktop's
/// uploader keeps in flight at most (8 connections of 1 MiB). Starting from 4, the window
/// took four round trips to fill a 100 MB/s link 100 ms away (measured with tg_bench
/// --timeline: 21, 16, 26 and 84 % of the link in the first four tenths of a second of
/// parts), about a third of a second lost by every storage's first transfer.
const INITIAL: f64 = 16.0;

#[derive(Debug)]
struct State {
    /// Parts allowed in flight (fractional while growing slowly).
    size: f64,
    /// Size below which the window still grows fast.
    threshold: f64,
    in_flight: usize,
    /// Parts transfers have announced and not yet taken room for (see [`Window::announce`]).
    announced: usize,
    /// Smoothed time from sending a part to its answer.
    round_trip: Option<Duration>,
    last_cut: Option<Instant>,
    cuts: u64,
    peak: usize,
    /// Parts waiting for room, by (order of their transfer, arrival).
    waiting: BTreeSet<(u64, u64)>,
    /// The next transfer's order, and the next arrival.
    next_order: u64,
    next_arrival: u64,
}

pub struct Window {
    max: usize,
    state: Mutex<State>,
    freed: Notify,
}

/// Room for one part in flight; given back when dropped.
pub struct Slot {
    window: Arc<Window>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.window.state.lock().unwrap().in_flight -= 1;
        self.window.freed.notify_waiters();
    }
}

/// A part's place in line; leaving it (a cancelled wait) lets the next one go.
struct InLine<'a> {
    window: &'a Window,
    key: Option<(u64, u64)>,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.window.state.lock().unwrap().waiting.remove(&key);
            self.window.freed.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Window {
    /// A window of at most `max` parts in flight.
    pub fn new(max: usize) -> Arc<Window> {
        let max = max.max(1);
        Arc::new(Window {
            max,
            state: Mutex::new(State {
                size: INITIAL.min(max as f64),
                threshold: max as f64,
                in_flight: 0,
                announced: 0,
                round_trip: None,
                last_cut: None,
                cuts: 0,
                peak: 0,
                waiting: BTreeSet::new(),
                next_order: 0,
                next_arrival: 0,
            }),
            freed: Notify::new(),
        })
    }

    /// A place in line for a transfer starting now: its parts get room after those of every
    /// transfer that took its place before.
    pub fn order(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_order += 1;
        s.next_order
    }

    /// Waits for room for one more part, behind every part waiting before it. Cancel-safe:
    /// dropping the future takes nothing and leaves the line.
    pub async fn slot(self: &Arc<Self>) -> Slot {
        let order = self.order();
        self.slot_in_order(order).await
    }

    /// Waits for room for one more part of the transfer with place `order` (see
    /// [`Window::order`]): parts of earlier transfers go first, then those that came first.
    /// Cancel-safe like [`Window::slot`].
    pub async fn slot_in_order(self: &Arc<Self>, order: u64) -> Slot {
        self.wait_in_order(order, false).await
    }

    /// [`Window::slot_in_order`] for one of the parts announced with [`Window::announce`]: it
    /// leaves the announced parts in the same step as it takes its room, so that
    /// [`Window::demand`] never counts it twice.
    pub async fn announced_slot_in_order(self: &Arc<Self>, order: u64) -> Slot {
        self.wait_in_order(order, true).await
    }

    async fn wait_in_order(self: &Arc<Self>, order: u64, announced: bool) -> Slot {
        let key = {
            let mut s = self.state.lock().unwrap();
            s.next_arrival += 1;
            let key = (order, s.next_arrival);
            s.waiting.insert(key);
            key
        };
        let mut in_line = InLine {
            window: self,
            key: Some(key),
        };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(s) = self.take_if_first(key, announced) {
                in_line.key = None;
                return s;
            }
            freed.await;
        }
    }

    /// Room for the part waiting as `key`, if it is first in line and there is room.
    fn take_if_first(self: &Arc<Self>, key: (u64, u64), announced: bool) -> Option<Slot> {
        let more = {
            let mut s = self.state.lock().unwrap();
            if s.waiting.first() != Some(&key) || s.in_flight >= s.size as usize {
                return None;
            }
            s.waiting.remove(&key);
            if announced {
                s.announced = s.announced.saturating_sub(1);
            }
            s.in_flight += 1;
            s.peak = s.peak.max(s.in_flight);
            s.in_flight < s.size as usize && !s.waiting.is_empty()
        };
        if more {
            // The next in line may fit too.
            self.freed.notify_waiters();
        }
        Some(Slot {
            window: self.clone(),
        })
    }

    /// Room for one more part, if there is some now and no part is waiting for it.
    pub fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.state.lock().unwrap();
        if s.in_flight >= s.size as usize || !s.waiting.is_empty() {
            return None;
        }
        s.in_flight += 1;
        s.peak = s.peak.max(s.in_flight);
        Some(Slot {
            window: self.clone(),
        })
    }

    /// Parts allowed in flight now.
    pub fn size(&self) -> usize {
        self.state.lock().unwrap().size as usize
    }

    /// Announces `parts` a transfer is about to send (see [`Window::demand`]).
    pub fn announce(&self, parts: usize) {
        self.state.lock().unwrap().announced += parts;
    }

    /// Withdraws announced parts that will not be sent after all.
    pub fn withdraw(&self, parts: usize) {
        let mut s = self.state.lock().unwrap();
        s.announced = s.announced.saturating_sub(parts);
    }

    /// Parts in flight and parts announced, read together: a part moving from one to the
    /// other is counted once, whichever thread looks.
    pub fn demand(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.in_flight + s.announced
    }

    /// Parts in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }

    /// The bound the window never exceeds.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The most parts that were in flight at once.
    pub fn peak(&self) -> usize {
        self.state.lock().unwrap().peak
    }

    /// How many times the window was halved.
    pub fn cuts(&self) -> u64 {
        self.state.lock().unwrap().cuts
    }

    /// A part was answered `took` after it was sent: grow.
    pub fn on_success(&self, took: Duration) {
        let grew = {
            let mut s = self.state.lock().unwrap();
            s.round_trip = Some(match s.round_trip {
                Some(rt) => rt.mul_f64(0.875) + took.mul_f64(0.125),
                None => took,
            });
            let before = s.size as usize;
            let step = if s.size < s.threshold {
                1.0
            } else {
                1.0 / s.size
            };
            s.size = (s.size + step).min(self.max as f64);
            s.size as usize > before
        };
        if grew {
            self.freed.notify_waiters();
        }
    }

    /// Telegram asked to slow down, or a part failed: halve, unless the window was already
    /// halved within the last round trip (the same trouble hitting several parts in flight).
    pub fn on_trouble(&self) {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        let guard = s.round_trip.unwrap_or(Duration::from_secs(1));
        if s.last_cut.is_some_and(|t| now.duration_since(t) < guard) {
            return;
        }
        s.threshold = (s.size / 2.0).max(1.0);
        s.size = s.threshold;
        s.last_cut = Some(now);
        s.cuts += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_fresh_window_lets_sixteen_parts_go_before_any_answer() {
        let w = Window::new(32);
        let slots: Vec<Slot> = std::iter::from_fn(|| w.try_slot()).take(32).collect();
        assert_eq!(slots.len(), 16, "8 MiB in flight in the first round trip");
        // A bound below that is the start.
        let small = Window::new(6);
        let slots: Vec<Slot> = std::iter::from_fn(|| small.try_slot()).take(32).collect();
        assert_eq!(slots.len(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn grows_fast_until_trouble_then_slowly() {
        let w = Window::new(64);
        assert_eq!(w.size(), 16);
        // Slow start: one more per answer, so the window doubles every round trip.
        for _ in 0..16 {
            w.on_success(Duration::from_millis(100));
        }
        assert_eq!(w.size(), 32);
        w.on_trouble();
        assert_eq!(w.size(), 16);
        w.on_trouble();
        tokio::time::advance(Duration::from_millis(150)).await;
        w.on_trouble();
        assert_eq!(w.size(), 8);
        // After trouble: about one more part per window's worth of answers.
        for _ in 0..8 {
            w.on_success(Duration::from_millis(100));
        }
        assert_eq!(w.size(), 8, "not yet a whole window of answers");
        for _ in 0..2 {
            w.on_success(Duration::from_millis(100));
        }
        assert_eq!(w.size(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn trouble_halves_once_per_round_trip_and_never_below_one() {
        let w = Window::new(32);
        for _ in 0..28 {
            w.on_success(Duration::from_millis(200));
        }
        assert_eq!(w.size(), 32, "capped at its bound");
        // Eight parts hit by the same flood wait: one halving.
        for _ in 0..8 {
            w.on_trouble();
        }
        assert_eq!((w.size(), w.cuts()), (16, 1));
        tokio::time::advance(Duration::from_millis(250)).await;
        w.on_trouble();
        assert_eq!((w.size(), w.cuts()), (8, 2));
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            w.on_trouble();
        }
        assert_eq!(w.size(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn room_goes_to_the_earliest_transfer_and_a_cancelled_wait_leaves_the_line() {
        use futures_util::FutureExt;
        use std::pin::pin;
        let w = Window::new(1);
        let (first, second) = (w.order(), w.order());
        let held = w.slot().await;
        // A part of the later transfer comes first, then one of the earlier transfer that
        // gives up, then another of the earlier transfer.
        let mut late = pin!(w.slot_in_order(second));
        assert!(late.as_mut().now_or_never().is_none(), "no room yet");
        {
            let mut gives_up = pin!(w.slot_in_order(first));
            assert!(gives_up.as_mut().now_or_never().is_none());
        }
        let mut early = pin!(w.slot_in_order(first));
        assert!(early.as_mut().now_or_never().is_none());
        assert!(w.try_slot().is_none(), "no room taken past the line");
        drop(held);
        // Whichever is polled first, the room is the earlier transfer's.
        assert!(
            late.as_mut().now_or_never().is_none(),
            "the later transfer waits behind the earlier one"
        );
        let got = early
            .as_mut()
            .now_or_never()
            .expect("the earlier transfer's part goes first, the cancelled one out of the way");
        drop(got);
        assert!(late.as_mut().now_or_never().is_some(), "then the later one");
    }

    #[tokio::test(start_paused = true)]
    async fn slots_wait_for_room_and_come_back_when_dropped() {
        let w = Window::new(2);
        assert_eq!(w.size(), 2);
        let a = w.slot().await;
        let _b = w.slot().await;
        assert!(w.try_slot().is_none(), "full");
        let waiter = {
            let w = w.clone();
            tokio::spawn(async move { w.slot().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("a freed slot wakes the waiter")
            .unwrap();
        assert_eq!(w.peak(), 2);
        drop(c);
        // A shrunk window lets in no new part until enough have come back.
        w.on_trouble();
        assert_eq!(w.size(), 1);
        assert!(
            w.try_slot().is_none(),
            "the part still in flight fills a window of one"
        );
    }
}
