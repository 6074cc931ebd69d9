//! Which snapshots a keep policy keeps: restic's `forget` rules, as a pure function.
//!
//! The semantics are restic's documented ones (`restic forget --keep-*`):
//! - snapshots are considered newest first;
//! - `last N` keeps the N newest snapshots;
//! - `hourly/daily/weekly/monthly/yearly N` keep, for each of the N most recent periods that
//!   have a snapshot, the newest snapshot of that period (weeks are ISO weeks, starting on
//!   Monday); a period without a snapshot does not count;
//! - `within D` keeps every snapshot taken within D of the newest snapshot (not of now), so a
//!   repository that stopped getting backups does not lose its last ones by waiting;
//! - a snapshot kept by any rule is kept, and every rule that keeps it is named.
//!
//! Periods are calendar periods in the time zone the schedules use (`STORINATOR_TIMEZONE`), so
//! "daily" means the user's days, DST included.

use jiff::tz::TimeZone;

/// A keep policy. `None` (or 0) leaves a rule out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    /// Keep every snapshot within this many milliseconds of the newest one.
    pub within_ms: Option<i64>,
}

/// Why a snapshot stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeepReason {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    Within,
}

impl KeepReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Last => "last",
            KeepReason::Hourly => "hourly",
            KeepReason::Daily => "daily",
            KeepReason::Weekly => "weekly",
            KeepReason::Monthly => "monthly",
            KeepReason::Yearly => "yearly",
            KeepReason::Within => "within",
        }
    }
}

/// The decision for one snapshot: the rules that keep it (empty: it goes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index into the slice handed to [`apply`].
    pub index: usize,
    pub reasons: Vec<KeepReason>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

impl KeepPolicy {
    /// True when no rule is given (such a policy keeps nothing).
    pub fn is_empty(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .all(|n| n.unwrap_or(0) == 0)
            && self.within_ms.is_none()
    }

    /// Parses `keep daily 7 weekly 4 within 30d` (the chat's and the schedules' form; the
    /// leading `keep` is optional).
    pub fn parse(text: &str) -> Result<KeepPolicy, String> {
        const HINT: &str = "hint: a policy is `keep` followed by pairs like daily 7 weekly 4 monthly 12 (last, hourly, daily, weekly, monthly, yearly, within <duration>)";
        let mut words = text.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.eq_ignore_ascii_case("keep")) {
            words.next();
        }
        let mut p = KeepPolicy::default();
        while let Some(unit) = words.next() {
            let value = words
                .next()
                .ok_or_else(|| format!("keep {unit} how many?\n{HINT}"))?;
            let unit_l = unit.to_ascii_lowercase();
            if unit_l == "within" {
                if p.within_ms.is_some() {
                    return Err(format!("within is given twice\n{HINT}"));
                }
                p.within_ms = Some(parse_duration(value).map_err(|e| format!("{e}\n{HINT}"))?);
                continue;
            }
            let n: u32 = value
                .parse()
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or_else(|| format!("{value:?} is not a count from 1 to 1000000\n{HINT}"))?;
            let slot = match unit_l.as_str() {
                "last" => &mut p.last,
                "hourly" => &mut p.hourly,
                "daily" => &mut p.daily,
                "weekly" => &mut p.weekly,
                "monthly" => &mut p.monthly,
                "yearly" => &mut p.yearly,
                _ => return Err(format!("{unit:?} is not a retention rule\n{HINT}")),
            };
            if slot.is_some() {
                return Err(format!("{unit_l} is given twice\n{HINT}"));
            }
            *slot = Some(n);
        }
        if p.is_empty() {
            return Err(format!("keep what?\n{HINT}"));
        }
        Ok(p)
    }
}

impl std::fmt::Display for KeepPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("keep")?;
        for (name, n) in [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ] {
            if let Some(n) = n.filter(|n| *n > 0) {
                write!(f, " {name} {n}")?;
            }
        }
        if let Some(ms) = self.within_ms {
            write!(f, " within {}", format_duration(ms))?;
        }
        Ok(())
    }
}

/// Parses a duration like restic's `--keep-within`: `1y2m3d4h` (years, months of 30 days,
/// days, hours), plus `w` for weeks and `s`/`min` are not accepted (periods shorter than an
/// hour are not a retention unit). Returns milliseconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?} is not a duration like 30d, 12h, 1y6m or 2w");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let hours = match ch {
            'h' => 1,
            'd' => 24,
            'w' => 24 * 7,
            'm' => 24 * 30,
            'y' => 24 * 365,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(hours * 3_600_000)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

fn format_duration(ms: i64) -> String {
    let h = ms / 3_600_000;
    if h % 24 == 0 {
        format!("{}d", h / 24)
    } else {
        format!("{h}h")
    }
}

/// The period a snapshot taken at `ms` falls in, for each bucket rule, in `tz`.
fn periods(ms: i64, tz: &TimeZone) -> [i64; 5] {
    let z = jiff::Timestamp::from_millisecond(ms)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(tz.clone());
    let (y, m, d, h) = (
        i64::from(z.year()),
        i64::from(z.month()),
        i64::from(z.day()),
        i64::from(z.hour()),
    );
    let iso = z.date().iso_week_date();
    [
        ((y * 100 + m) * 100 + d) * 100 + h,
        (y * 100 + m) * 100 + d,
        i64::from(iso.year()) * 100 + i64::from(iso.week()),
        y * 100 + m,
        y,
    ]
}

/// Applies `policy` to snapshots taken at `times` (Unix ms, any order; one timeline: one
/// root of one owner). Returns one decision per snapshot, in the order given.
pub fn apply(policy: &KeepPolicy, times: &[i64], tz: &TimeZone) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..times.len()).collect();
    // Newest first; ties keep their given order so the result is deterministic.
    order.sort_by(|a, b| times[*b].cmp(&times[*a]).then(a.cmp(b)));
    let mut out: Vec<Decision> = (0..times.len())
        .map(|index| Decision {
            index,
            reasons: Vec::new(),
        })
        .collect();
    let mut last_left = policy.last.unwrap_or(0);
    let buckets = [
        (KeepReason::Hourly, policy.hourly),
        (KeepReason::Daily, policy.daily),
        (KeepReason::Weekly, policy.weekly),
        (KeepReason::Monthly, policy.monthly),
        (KeepReason::Yearly, policy.yearly),
    ];
    let mut left: [u32; 5] = buckets.map(|(_, n)| n.unwrap_or(0));
    let mut seen: [Option<i64>; 5] = [None; 5];
    let newest = order.first().map(|i| times[*i]);
    for &i in &order {
        let reasons = &mut out[i].reasons;
        if last_left > 0 {
            last_left -= 1;
            reasons.push(KeepReason::Last);
        }
        let p = periods(times[i], tz);
        for (b, (reason, _)) in buckets.iter().enumerate() {
            if left[b] > 0 && seen[b] != Some(p[b]) {
                seen[b] = Some(p[b]);
                left[b] -= 1;
                reasons.push(*reason);
            }
        }
        if let (Some(within), Some(newest)) = (policy.within_ms, newest)
            && times[i] > newest.saturating_sub(within)
        {
            reasons.push(KeepReason::Within);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    /// Unix ms of a civil time in `tz`.
    fn at(s: &str, tz: &TimeZone) -> i64 {
        let dt: jiff::civil::DateTime = s.parse().unwrap();
        dt.to_zoned(tz.clone())
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn kept(policy: &KeepPolicy, times: &[i64], tz: &TimeZone) -> Vec<usize> {
        apply(policy, times, tz)
            .into_iter()
            .filter(Decision::keep)
            .map(|d| d.index)
            .collect()
    }

    /// One snapshot a day at noon for `days` days from 2024-01-01, oldest first.
    fn daily_series(days: i64) -> Vec<i64> {
        let start = at("2024-01-01T12:00", &utc());
        (0..days).map(|d| start + d * 86_400_000).collect()
    }

    #[test]
    fn the_rules_table() {
        let tz = utc();
        // Times (oldest first) used by the table: three on one day, one a day later, one a
        // week later, one a month later, one a year later.
        let t: Vec<i64> = [
            "2023-12-31T23:30", // 0: Sunday, last day of 2023, ISO week 52 of 2023
            "2024-01-01T08:10", // 1: Monday, ISO week 1
            "2024-01-01T08:50", // 2: same hour as 1
            "2024-01-01T09:05", // 3
            "2024-01-02T10:00", // 4
            "2024-01-09T10:00", // 5
            "2024-02-09T10:00", // 6
        ]
        .iter()
        .map(|s| at(s, &tz))
        .collect();
        let p = |f: fn(&mut KeepPolicy)| {
            let mut p = KeepPolicy::default();
            f(&mut p);
            p
        };
        let table: Vec<(&str, KeepPolicy, Vec<usize>)> = vec![
            ("last 1", p(|p| p.last = Some(1)), vec![6]),
            ("last 3", p(|p| p.last = Some(3)), vec![4, 5, 6]),
            (
                "last more than exist",
                p(|p| p.last = Some(50)),
                (0..7).collect(),
            ),
            // Newest per hour: 08:50 stands for 08:xx, 08:10 goes.
            ("hourly 5", p(|p| p.hourly = Some(5)), vec![2, 3, 4, 5, 6]),
            (
                "hourly 10",
                p(|p| p.hourly = Some(10)),
                vec![0, 2, 3, 4, 5, 6],
            ),
            // Newest per day: the latest of 2024-01-01 (09:05) stands for the day.
            ("daily 3", p(|p| p.daily = Some(3)), vec![4, 5, 6]),
            ("daily 5", p(|p| p.daily = Some(5)), vec![0, 3, 4, 5, 6]),
            // ISO weeks: 2024-01-01 and -02 are week 1; Sunday 2023-12-31 is week 52 of 2023.
            ("weekly 3", p(|p| p.weekly = Some(3)), vec![4, 5, 6]),
            ("weekly 4", p(|p| p.weekly = Some(4)), vec![0, 4, 5, 6]),
            ("monthly 2", p(|p| p.monthly = Some(2)), vec![5, 6]),
            ("monthly 3", p(|p| p.monthly = Some(3)), vec![0, 5, 6]),
            ("yearly 1", p(|p| p.yearly = Some(1)), vec![6]),
            ("yearly 2", p(|p| p.yearly = Some(2)), vec![0, 6]),
            // Within is measured from the newest snapshot, not from now.
            (
                "within 32d",
                p(|p| p.within_ms = Some(32 * 86_400_000)),
                vec![5, 6],
            ),
            (
                "within 39d",
                p(|p| p.within_ms = Some(39 * 86_400_000)),
                vec![4, 5, 6],
            ),
            (
                "within 40d",
                p(|p| p.within_ms = Some(40 * 86_400_000)),
                (0..7).collect(),
            ),
            // A snapshot kept by any rule is kept: the union.
            (
                "last 1 + daily 2 + yearly 2",
                p(|p| {
                    p.last = Some(1);
                    p.daily = Some(2);
                    p.yearly = Some(2);
                }),
                vec![0, 5, 6],
            ),
            (
                "hourly 2 + monthly 3",
                p(|p| {
                    p.hourly = Some(2);
                    p.monthly = Some(3);
                }),
                vec![0, 5, 6],
            ),
            ("empty policy keeps nothing", KeepPolicy::default(), vec![]),
        ];
        for (name, policy, want) in table {
            assert_eq!(kept(&policy, &t, &tz), want, "{name}");
        }
        // Given in any order, decided the same.
        let mut shuffled = t.clone();
        shuffled.reverse();
        let p3 = p(|p| p.daily = Some(3));
        let back: Vec<usize> = kept(&p3, &shuffled, &tz)
            .into_iter()
            .map(|i| 6 - i)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(back, vec![4, 5, 6]);
    }

    #[test]
    fn reasons_name_every_rule_that_keeps_a_snapshot() {
        let tz = utc();
        let t = daily_series(3);
        let policy = KeepPolicy {
            last: Some(1),
            daily: Some(2),
            within_ms: Some(36 * 3_600_000),
            ..Default::default()
        };
        let d = apply(&policy, &t, &tz);
        assert_eq!(
            d[2].reasons,
            vec![KeepReason::Last, KeepReason::Daily, KeepReason::Within]
        );
        assert_eq!(d[1].reasons, vec![KeepReason::Daily, KeepReason::Within]);
        assert!(!d[0].keep());
    }

    /// restic's documentation: daily backups for a long time, then
    /// `--keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75` keeps the 7 most
    /// recent dailies, 4 more last-day-of-the-weeks (the dailies already hold one weekly),
    /// 11 or 12 last-day-of-the-months and the last-day-of-the-years.
    #[test]
    fn restic_documented_daily_weekly_monthly_yearly_example() {
        let tz = utc();
        let t = daily_series(1197); // 2024-01-01 .. Sunday 2027-04-11
        let policy = KeepPolicy {
            daily: Some(7),
            weekly: Some(5),
            monthly: Some(12),
            yearly: Some(75),
            ..Default::default()
        };
        let d = apply(&policy, &t, &tz);
        let with = |r: KeepReason| d.iter().filter(|d| d.reasons.contains(&r)).count();
        assert_eq!(with(KeepReason::Daily), 7);
        assert_eq!(with(KeepReason::Weekly), 5);
        assert_eq!(with(KeepReason::Monthly), 12);
        assert_eq!(with(KeepReason::Yearly), 4); // 2024, 2025, 2026, 2027
        // Weeklies beyond the dailies: the Sundays (last day of each ISO week).
        let weekly_only: Vec<_> = d
            .iter()
            .filter(|d| d.reasons == vec![KeepReason::Weekly])
            .collect();
        assert_eq!(weekly_only.len(), 4, "7 dailies already hold one weekly");
        for w in weekly_only {
            let z = jiff::Timestamp::from_millisecond(t[w.index])
                .unwrap()
                .to_zoned(tz.clone());
            assert_eq!(z.weekday(), jiff::civil::Weekday::Sunday);
        }
        // Yearlies are the last day of each year (and the newest for the current one).
        let last_of_2025 = at("2025-12-31T12:00", &tz);
        let i = t.iter().position(|x| *x == last_of_2025).unwrap();
        assert!(d[i].reasons.contains(&KeepReason::Yearly));
        let total = d.iter().filter(|d| d.keep()).count();
        // 7 daily + 4 weekly + 11 monthly (April's is a daily) + 2 yearly (2026's last day is
        // December's monthly, 2027's is the newest daily).
        assert_eq!(total, 7 + 4 + 11 + 2);
    }

    /// restic's documented `--keep-last 3` wording plus its `--keep-hourly` note: with
    /// several snapshots in one hour only the newest of that hour counts.
    #[test]
    fn restic_documented_hourly_counts_periods_not_snapshots() {
        let tz = utc();
        let t: Vec<i64> = ["2024-05-01T10:05", "2024-05-01T10:45", "2024-05-01T12:15"]
            .iter()
            .map(|s| at(s, &tz))
            .collect();
        let policy = KeepPolicy {
            hourly: Some(3),
            ..Default::default()
        };
        // Two hours have snapshots: 12:xx and 10:xx (newest: 10:45); 11:xx has none and
        // does not use up a slot.
        assert_eq!(kept(&policy, &t, &tz), vec![1, 2]);
    }

    #[test]
    fn days_are_the_schedule_time_zone_s_days() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 23:30 and 00:30 Berlin time are one UTC day but two Berlin days.
        let t = [
            at("2024-03-01T23:30", &berlin),
            at("2024-03-02T00:30", &berlin),
        ];
        let policy = KeepPolicy {
            daily: Some(2),
            ..Default::default()
        };
        assert_eq!(kept(&policy, &t, &berlin), vec![0, 1]);
        assert_eq!(kept(&policy, &t, &utc()), vec![1], "one UTC day");
        // Across the spring DST change (2024-03-31 02:00 -> 03:00) days still count once.
        let t = [
            at("2024-03-30T23:00", &berlin),
            at("2024-03-31T01:30", &berlin),
            at("2024-03-31T03:30", &berlin),
        ];
        assert_eq!(kept(&policy, &t, &berlin), vec![0, 2]);
    }

    #[test]
    fn parses_the_chat_form_and_names_bad_input() {
        let p = KeepPolicy::parse("keep daily 7 weekly 4 monthly 12 within 30d").unwrap();
        assert_eq!(p.daily, Some(7));
        assert_eq!(p.monthly, Some(12));
        assert_eq!(p.within_ms, Some(30 * 86_400_000));
        assert_eq!(p.to_string(), "keep daily 7 weekly 4 monthly 12 within 30d");
        assert!(
            KeepPolicy::parse("keep")
                .unwrap_err()
                .starts_with("keep what?")
        );
        assert!(
            KeepPolicy::parse("keep fortnightly 2")
                .unwrap_err()
                .contains("\"fortnightly\"")
        );
        assert!(KeepPolicy::parse("daily x").unwrap_err().contains("\"x\""));
        assert!(parse_duration("1y2m3d4h").is_ok());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5s").is_err());
    }
}
