//! The network between a client and the loopback Telegram, emulated in the server (kernel
//! traffic shaping is not available where the tests run).
//!
//! Each connection is a pair of FIFO lanes, client→server and server→client. A message handed
//! to a lane first waits for the lane to be free, then takes `bytes / conn_bytes_per_sec` to
//! go out (bandwidth), then `rtt / 2` plus a jitter sample to arrive (propagation). Every
//! message is scheduled on its own, so requests pipelined on one connection overlap exactly as
//! on a real link: ten requests sent at once come back about one round trip later, not ten.
//! Arrivals never overtake each other (TCP keeps order). A cap shared by all connections
//! (`LoopbackOptions::bandwidth`) applies on top, to part and download bytes.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Network conditions of every connection to the loopback Telegram. Settable at start
/// (`LoopbackOptions::net`) and while running (`LoopbackTelegram::set_net`); a change
/// applies to the next message on every connection.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NetProfile {
    /// Round-trip time: each message takes half of it to cross, in either direction.
    pub rtt: Duration,
    /// Extra one-way delay, drawn uniformly from `[0, jitter]` for each message.
    pub jitter: Duration,
    /// Cap on each connection's bytes per second, in each direction (`None`: uncapped).
    pub conn_bytes_per_sec: Option<u64>,
}

impl NetProfile {
    /// A link with this round-trip time and nothing else.
    pub fn with_rtt(rtt: Duration) -> Self {
        NetProfile {
            rtt,
            ..Default::default()
        }
    }

    /// Megabits per second (as links are sold) to bytes per second.
    pub fn mbps(megabits: f64) -> u64 {
        (megabits * 1_000_000.0 / 8.0).round().max(1.0) as u64
    }

    pub(crate) fn is_ideal(&self) -> bool {
        self.rtt.is_zero() && self.jitter.is_zero() && self.conn_bytes_per_sec.is_none()
    }
}

/// One direction of one connection.
#[derive(Default)]
pub(crate) struct Lane {
    /// When the lane finishes sending what it was given so far.
    free_at: Option<Instant>,
    /// The latest arrival scheduled (arrivals keep their order).
    last_arrival: Option<Instant>,
}

impl Lane {
    /// The client→server lane of a connection accepted at `accepted`. TCP's handshake (SYN,
    /// SYN-ACK) takes a round trip before the client's first bytes can go out; the loopback's
    /// kernel completes it at once, so the lane stays busy for that long instead.
    pub(crate) fn after_handshake(accepted: Instant, p: &NetProfile) -> Lane {
        Lane {
            free_at: Some(accepted + p.rtt),
            last_arrival: None,
        }
    }

    /// When a message of `bytes` handed to the lane at `sent` reaches the other end.
    pub(crate) fn schedule(
        &mut self,
        p: &NetProfile,
        sent: Instant,
        bytes: usize,
        rng: &mut u64,
    ) -> Instant {
        let start = self.free_at.map_or(sent, |f| f.max(sent));
        let tx = match p.conn_bytes_per_sec {
            Some(rate) if rate > 0 => Duration::from_secs_f64(bytes as f64 / rate as f64),
            _ => Duration::ZERO,
        };
        let done = start + tx;
        self.free_at = Some(done);
        let jitter = if p.jitter.is_zero() {
            Duration::ZERO
        } else {
            p.jitter.mul_f64(xorshift_f64(rng))
        };
        let arrival = done + p.rtt / 2 + jitter;
        let arrival = self.last_arrival.map_or(arrival, |l| l.max(arrival));
        self.last_arrival = Some(arrival);
        arrival
    }

    /// How long the lane stays busy with what it already holds.
    pub(crate) fn backlog(&self, now: Instant) -> Duration {
        self.free_at
            .map_or(Duration::ZERO, |f| f.saturating_duration_since(now))
    }
}

/// Bytes in flight a sender can have before its writes block (socket buffers): beyond this
/// backlog the server stops reading, so a capped link pushes back on the client as TCP does.
pub(crate) const SOCKET_BUFFER_BYTES: u64 = 4 * 1024 * 1024;

/// A cap on bytes per second shared by all connections.
#[derive(Default)]
pub(crate) struct SharedCap {
    rate: Mutex<Option<u64>>,
    next: Mutex<Option<Instant>>,
}

impl SharedCap {
    pub(crate) fn new(rate: Option<u64>) -> Self {
        SharedCap {
            rate: Mutex::new(rate),
            next: Mutex::new(None),
        }
    }

    pub(crate) fn set(&self, rate: Option<u64>) {
        *self.rate.lock().unwrap() = rate;
    }

    /// Waits until `bytes` more fit under the cap.
    pub(crate) async fn take(&self, bytes: u64) {
        let Some(rate) = *self.rate.lock().unwrap() else {
            return;
        };
        let until = {
            let mut next = self.next.lock().unwrap();
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            let end = start + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
            *next = Some(end);
            end
        };
        tokio::time::sleep_until(until).await;
    }
}

/// xorshift64*: deterministic enough for jitter and fault probabilities, no extra dependency.
pub(crate) fn xorshift_f64(s: &mut u64) -> f64 {
    if *s == 0 {
        *s = 0x9E37_79B9_7F4A_7C15;
    }
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lanes_delay_each_message_and_overlap_pipelined_ones() {
        let p = NetProfile::with_rtt(Duration::from_millis(100));
        let mut lane = Lane::default();
        let mut rng = 1;
        let t0 = Instant::now();
        // Ten messages handed over at once all arrive half a round trip later.
        for _ in 0..10 {
            let at = lane.schedule(&p, t0, 100, &mut rng);
            assert_eq!(at - t0, Duration::from_millis(50));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connections_first_bytes_wait_for_the_handshake() {
        let p = NetProfile::with_rtt(Duration::from_millis(100));
        let t0 = Instant::now();
        let mut lane = Lane::after_handshake(t0, &p);
        let mut rng = 1;
        // Sent at once, they go out after the handshake's round trip and cross in half one.
        assert_eq!(
            lane.schedule(&p, t0, 100, &mut rng) - t0,
            Duration::from_millis(150)
        );
        // Later messages only cross.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            lane.schedule(&p, later, 100, &mut rng) - later,
            Duration::from_millis(50)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bandwidth_serialises_a_lane_and_jitter_keeps_order() {
        let p = NetProfile {
            rtt: Duration::from_millis(20),
            jitter: Duration::from_millis(30),
            conn_bytes_per_sec: Some(1_000_000),
        };
        let mut lane = Lane::default();
        let mut rng = 7;
        let t0 = Instant::now();
        let mut last = t0;
        for i in 1..=20u32 {
            let at = lane.schedule(&p, t0, 100_000, &mut rng);
            // 100 kB at 1 MB/s is 100 ms on the wire each, back to back.
            let on_wire = Duration::from_millis(100) * i;
            assert!(at - t0 >= on_wire + Duration::from_millis(10), "{i}");
            assert!(at - t0 <= on_wire + Duration::from_millis(40), "{i}");
            assert!(at >= last, "arrivals keep their order");
            last = at;
        }
        assert_eq!(lane.backlog(t0), Duration::from_secs(2));
    }

    #[test]
    fn mbps_are_megabits() {
        assert_eq!(NetProfile::mbps(8.0), 1_000_000);
    }
}
