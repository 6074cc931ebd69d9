//! What the canary found about each storage lane (see `engine::canary`).

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Catalog, db};
use crate::error::Error;

/// How a lane answered its last probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneState {
    Ok,
    /// It did not answer.
    Silent,
    /// It answers, but packs the catalog places there are gone.
    Lost,
}

impl LaneState {
    pub fn as_str(self) -> &'static str {
        match self {
            LaneState::Ok => "ok",
            LaneState::Silent => "silent",
            LaneState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<LaneState> {
        match s {
            "ok" => Some(LaneState::Ok),
            "silent" => Some(LaneState::Silent),
            "lost" => Some(LaneState::Lost),
            _ => None,
        }
    }
}

/// The outcome of probing one lane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneProbe {
    pub lane: String,
    pub state: LaneState,
    /// Why it is silent, or which packs are gone.
    pub detail: String,
    /// Copies the catalog places in the lane, and how many of them it no longer holds.
    pub copies: u64,
    pub missing: u64,
}

/// A lane's recorded health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneHealth {
    pub probe: LaneProbe,
    /// When the current state began, and when the lane was last probed.
    pub since: i64,
    pub checked_at: i64,
    /// What chat users were last told about the lane (`None`: nothing yet).
    pub told_state: Option<LaneState>,
    pub told_missing: u64,
}

impl LaneHealth {
    /// Whether chat users should hear about the lane: its state changed since they were last
    /// told (a first "ok" is not news), or it lost more packs.
    pub fn is_news(&self) -> bool {
        let told = self.told_state.unwrap_or(LaneState::Ok);
        self.probe.state != told
            || (self.probe.state == LaneState::Lost && self.probe.missing > self.told_missing)
    }
}

impl Catalog {
    /// Records a probe of a lane at `now`.
    pub async fn record_lane_probe(&self, p: &LaneProbe, now: i64) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO lane_health (lane, state, detail, since, checked_at, copies, missing) \
             VALUES ($1, $2, $3, $4, $4, $5, $6) \
             ON CONFLICT (lane) DO UPDATE SET \
                since = CASE WHEN lane_health.state = excluded.state THEN lane_health.since ELSE excluded.since END, \
                state = excluded.state, detail = excluded.detail, checked_at = excluded.checked_at, \
                copies = excluded.copies, missing = excluded.missing",
        )
        .bind(&p.lane)
        .bind(p.state.as_str())
        .bind(&p.detail)
        .bind(now)
        .bind(p.copies as i64)
        .bind(p.missing as i64)
        .execute(&self.pool)
        .await
        .map_err(db("recording a lane probe"))?;
        Ok(())
    }

    /// Every lane's recorded health, by name.
    pub async fn lane_health(&self) -> Result<Vec<LaneHealth>, Error> {
        let rows = sqlx::query(
            "SELECT lane, state, detail, copies, missing, since, checked_at, told_state, told_missing \
             FROM lane_health ORDER BY lane",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading lane health"))?;
        Ok(rows
            .iter()
            .map(|r| LaneHealth {
                probe: LaneProbe {
                    lane: r.get(0),
                    state: LaneState::parse(r.get(1)).unwrap_or(LaneState::Ok),
                    detail: r.get(2),
                    copies: r.get::<i64, _>(3) as u64,
                    missing: r.get::<i64, _>(4) as u64,
                },
                since: r.get(5),
                checked_at: r.get(6),
                told_state: r
                    .get::<Option<String>, _>(7)
                    .and_then(|s| LaneState::parse(&s)),
                told_missing: r.get::<i64, _>(8) as u64,
            })
            .collect())
    }

    /// Records what chat users were told about a lane.
    pub async fn lane_told(&self, lane: &str, state: LaneState, missing: u64) -> Result<(), Error> {
        sqlx::query("UPDATE lane_health SET told_state = $1, told_missing = $2 WHERE lane = $3")
            .bind(state.as_str())
            .bind(missing as i64)
            .bind(lane)
            .execute(&self.pool)
            .await
            .map_err(db("recording a lane alert"))?;
        Ok(())
    }
}
