//! Rollups: what a funnel series needs of each handoff, tallied per local day of its attempt, so
//! that a year of days is read from a few thousand rows instead of millions of events.
//!
//! A handoff's events all count in its attempt's row, as the raw series counts them. A row is
//! kept per account, time zone, day and *grouping set* (no dimension, each dimension alone, and
//! each pair of them: 11 in all), so a query by channel reads only the channel rows. Its tally
//! keeps counts per stage exactly; the times to reply and to first response as histograms whose
//! bins are exact below [`EXACT_BELOW`] ms and 1/128 of their power of two above, so a
//! percentile comes out rounded down by less than 0.8 %; and, per attempt, the hours since the
//! consumer's previous attempt (up to [`MAX_REPEAT_HOURS`]), so any repeat window is answered.
//!
//! Both the append (for events it adds) and the builder (for events logged before a zone was
//! asked for) feed the same functions here, so the two backends and the two paths count alike.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};

use super::Grouping;

/// The longest repeat window a query may ask for, in hours (30 days).
pub const MAX_REPEAT_HOURS: i64 = 720;

/// Durations under this many milliseconds are kept exactly.
pub const EXACT_BELOW: i64 = 256;

/// The histogram bin a duration falls in: its own value below [`EXACT_BELOW`], else the value
/// with all but its 8 highest bits cleared.
pub fn bin(ms: i64) -> i64 {
    if ms < EXACT_BELOW {
        return ms;
    }
    let shift = 63 - ms.leading_zeros() as i64 - 7;
    (ms >> shift) << shift
}

/// The hours bin of the time since the consumer's previous attempt, in microseconds: the gap
/// rounded up to whole hours, so that a window of `n` hours holds it exactly when `bin <= n`.
/// `None` beyond [`MAX_REPEAT_HOURS`] (or for no gap at all).
pub fn gap_hours(gap_micros: i64) -> Option<i32> {
    const HOUR: i64 = 3_600_000_000;
    (gap_micros > 0 && gap_micros <= MAX_REPEAT_HOURS * HOUR)
        .then(|| i32::try_from((gap_micros + HOUR - 1) / HOUR).unwrap_or(i32::MAX))
}

/// One row's worth: counts per stage, two duration histograms and the repeat gaps. Every field
/// adds up, so tallies merge by addition whatever order they come in. Stored as its protobuf
/// encoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tally {
    /// FunnelStage number → events.
    #[prost(btree_map = "int32, int64", tag = "1")]
    pub stages: BTreeMap<i32, i64>,
    /// Histogram bin → RESPONDED events with that time since the attempt (ms).
    #[prost(btree_map = "int64, int64", tag = "2")]
    pub replies: BTreeMap<i64, i64>,
    /// Histogram bin → ANSWERED events with that response delay (ms).
    #[prost(btree_map = "int64, int64", tag = "3")]
    pub answers: BTreeMap<i64, i64>,
    /// Hours bin → attempts whose consumer was attempted that long before.
    #[prost(btree_map = "int32, int64", tag = "4")]
    pub gaps: BTreeMap<i32, i64>,
}

fn add<K: Ord + Copy>(into: &mut BTreeMap<K, i64>, from: &BTreeMap<K, i64>) {
    for (k, n) in from {
        let v = into.entry(*k).or_default();
        *v += n;
        if *v == 0 {
            into.remove(k);
        }
    }
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        add(&mut self.stages, &other.stages);
        add(&mut self.replies, &other.replies);
        add(&mut self.answers, &other.answers);
        add(&mut self.gaps, &other.gaps);
    }

    pub fn encoded(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }

    pub fn decoded(bytes: &[u8]) -> Result<Self, sqlx::Error> {
        <Self as prost::Message>::decode(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
    }

    /// Attempts whose consumer was attempted at most `hours` before.
    pub fn repeats(&self, hours: i64) -> u64 {
        let n: i64 = self
            .gaps
            .range(..=i32::try_from(hours).unwrap_or(i32::MAX))
            .map(|(_, n)| n)
            .sum();
        u64::try_from(n).unwrap_or_default()
    }
}

/// PostgreSQL's `percentile_disc` over a histogram: the bin holding the value whose place in the
/// sorted values first reaches the fraction `p`.
pub fn durations(histogram: &BTreeMap<i64, i64>) -> super::Durations {
    let count: i64 = histogram.values().sum();
    if count <= 0 {
        return super::Durations::default();
    }
    let at = |p: f64| {
        let rank = ((p * count as f64).ceil() as i64).clamp(1, count);
        let mut seen = 0;
        for (value, n) in histogram {
            seen += n;
            if seen >= rank {
                return *value;
            }
        }
        histogram.keys().next_back().copied().unwrap_or_default()
    };
    super::Durations {
        count: count as u64,
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

/// The grouping sets rows are kept for, by number: none, each dimension, each pair (in this
/// order within the pair).
pub const SETS: [(Grouping, Grouping); 11] = [
    (Grouping::None, Grouping::None),
    (Grouping::Channel, Grouping::None),
    (Grouping::HandoffConfig, Grouping::None),
    (Grouping::Skill, Grouping::None),
    (Grouping::IvrNumber, Grouping::None),
    (Grouping::Channel, Grouping::HandoffConfig),
    (Grouping::Channel, Grouping::Skill),
    (Grouping::Channel, Grouping::IvrNumber),
    (Grouping::HandoffConfig, Grouping::Skill),
    (Grouping::HandoffConfig, Grouping::IvrNumber),
    (Grouping::Skill, Grouping::IvrNumber),
];

/// The set a query's groupings read, and whether its two values come swapped.
pub fn set_of(group_by: &[Grouping]) -> Option<(i16, bool)> {
    let (a, b) = match group_by {
        [] => (Grouping::None, Grouping::None),
        [a] => (*a, Grouping::None),
        [a, b] => (*a, *b),
        _ => return None,
    };
    SETS.iter().enumerate().find_map(|(i, set)| {
        let i = i16::try_from(i).ok()?;
        if *set == (a, b) {
            Some((i, false))
        } else if *set == (b, a) {
            Some((i, true))
        } else {
            None
        }
    })
}

/// A handoff's ATTEMPTED event: when, and the dimensions every one of its events counts under.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub handoff_id: String,
    pub occurred_at: DateTime<Utc>,
    pub channel: String,
    pub handoff_config_id: String,
    pub skill_id: String,
    pub ivr_number: String,
    pub consumer_id: String,
}

/// One event of a handoff, as far as its tally goes.
#[derive(Debug, Clone)]
pub struct Step {
    pub handoff_id: String,
    pub stage: i32,
    pub occurred_at: DateTime<Utc>,
    pub channel: String,
    pub response_delay_ms: Option<i64>,
}

/// (day, grouping set, first value, second value).
pub type Key = (NaiveDate, i16, String, String);

/// Tallies being gathered for one account and time zone.
#[derive(Debug, Default)]
pub struct Rollup {
    pub rows: BTreeMap<Key, Tally>,
}

impl Rollup {
    /// Counts `step` of the handoff `attempt` opened, with its duration.
    pub fn add_step(&mut self, zone: chrono_tz::Tz, attempt: &Attempt, step: &Step) {
        let duration = match step.stage {
            s if s == RESPONDED => Some(
                (step.occurred_at - attempt.occurred_at)
                    .num_microseconds()
                    .unwrap_or(i64::MAX)
                    .div_euclid(1000),
            ),
            s if s == ANSWERED => step.response_delay_ms,
            _ => None,
        };
        self.each(zone, attempt, &step.channel, |tally| {
            *tally.stages.entry(step.stage).or_default() += 1;
            match (step.stage, duration) {
                (s, Some(ms)) if s == RESPONDED => *tally.replies.entry(bin(ms)).or_default() += 1,
                (s, Some(ms)) if s == ANSWERED => *tally.answers.entry(bin(ms)).or_default() += 1,
                _ => {}
            }
        });
    }

    /// Moves `attempt` from the gap bin `from` to `to` (either `None`: not a repeat at all).
    pub fn move_gap(
        &mut self,
        zone: chrono_tz::Tz,
        attempt: &Attempt,
        from: Option<i32>,
        to: Option<i32>,
    ) {
        if from == to {
            return;
        }
        self.each(zone, attempt, "", |tally| {
            for (hours, n) in [(from, -1), (to, 1)] {
                if let Some(hours) = hours {
                    *tally.gaps.entry(hours).or_default() += n;
                }
            }
        });
    }

    fn each(
        &mut self,
        zone: chrono_tz::Tz,
        attempt: &Attempt,
        channel: &str,
        mut f: impl FnMut(&mut Tally),
    ) {
        let day = attempt.occurred_at.with_timezone(&zone).date_naive();
        let value = |g: Grouping| -> String {
            match g {
                Grouping::None => String::new(),
                Grouping::Channel if channel.is_empty() => attempt.channel.clone(),
                Grouping::Channel => channel.to_owned(),
                Grouping::HandoffConfig => attempt.handoff_config_id.clone(),
                Grouping::Skill => attempt.skill_id.clone(),
                Grouping::IvrNumber => attempt.ivr_number.clone(),
            }
        };
        for (i, (a, b)) in SETS.iter().enumerate() {
            f(self
                .rows
                .entry((day, i as i16, value(*a), value(*b)))
                .or_default());
        }
    }
}

const RESPONDED: i32 = c2m_proto::v1::FunnelStage::Responded as i32;
const ANSWERED: i32 = c2m_proto::v1::FunnelStage::Answered as i32;

/// A stage's number from its name (0 for a name this build does not know).
pub fn stage_number(name: &str) -> i32 {
    c2m_proto::v1::FunnelStage::from_str_name(name).map_or(0, |s| s as i32)
}

/// One consumer's attempts around some new ones (`new` true), in any order: how each attempt's
/// gap bin changes now that the new ones are here. The new attempts had none before. An attempt's
/// gap is to the latest attempt of another handoff strictly before it. In time order, once.
pub fn gap_changes(
    attempts: &[(DateTime<Utc>, String, bool)],
) -> Vec<(usize, Option<i32>, Option<i32>)> {
    /// The latest attempt so far, and the latest of another handoff than that one's.
    #[derive(Default)]
    struct Latest<'a> {
        first: Option<(DateTime<Utc>, &'a str)>,
        second: Option<(DateTime<Utc>, &'a str)>,
    }
    impl<'a> Latest<'a> {
        fn before(&self, handoff: &str) -> Option<DateTime<Utc>> {
            match self.first {
                Some((t, h)) if h != handoff => Some(t),
                _ => self.second.map(|(t, _)| t),
            }
        }
        /// `at` is never earlier than what was seen.
        fn see(&mut self, at: DateTime<Utc>, handoff: &'a str) {
            if let Some((_, h)) = self.first
                && h != handoff
            {
                self.second = self.first;
            }
            self.first = Some((at, handoff));
        }
    }
    let mut order: Vec<usize> = (0..attempts.len()).collect();
    order.sort_by_key(|i| attempts[*i].0);
    let (mut all, mut old) = (Latest::default(), Latest::default());
    let mut changes = Vec::new();
    for group in order.chunk_by(|a, b| attempts[*a].0 == attempts[*b].0) {
        for &i in group {
            let (at, handoff, new) = &attempts[i];
            let gap = |p: Option<DateTime<Utc>>| {
                p.and_then(|p| gap_hours((*at - p).num_microseconds().unwrap_or(i64::MAX)))
            };
            let now = gap(all.before(handoff));
            let before = if *new { None } else { gap(old.before(handoff)) };
            if now != before {
                changes.push((i, before, now));
            }
        }
        for &i in group {
            let (at, handoff, new) = &attempts[i];
            all.see(*at, handoff);
            if !new {
                old.see(*at, handoff);
            }
        }
    }
    changes.sort_by_key(|c| c.0);
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_exact_below_256_and_within_a_128th_above() {
        for ms in [-5, 0, 1, 127, 255] {
            assert_eq!(bin(ms), ms);
        }
        assert_eq!(bin(256), 256);
        assert_eq!(bin(257), 256);
        assert_eq!(bin(258), 258);
        for ms in (256..5_000_000).step_by(997) {
            let b = bin(ms);
            assert!(b <= ms && (ms - b) * 128 < ms, "{ms} → {b}");
            assert_eq!(bin(b), b, "a bin is its own bin");
        }
    }

    #[test]
    fn a_gap_is_in_the_window_of_n_hours_exactly_when_its_bin_is_at_most_n() {
        const HOUR: i64 = 3_600_000_000;
        assert_eq!(gap_hours(0), None);
        assert_eq!(gap_hours(1), Some(1));
        assert_eq!(gap_hours(HOUR), Some(1));
        assert_eq!(gap_hours(HOUR + 1), Some(2));
        assert_eq!(gap_hours(720 * HOUR), Some(720));
        assert_eq!(gap_hours(720 * HOUR + 1), None);
    }

    #[test]
    fn percentiles_of_a_histogram_are_percentile_disc_of_its_bins() {
        let values = [10_i64, 20, 30, 40, 1000];
        let mut h = BTreeMap::new();
        for v in values {
            *h.entry(bin(v)).or_default() += 1;
        }
        let d = durations(&h);
        assert_eq!(
            (d.count, d.p50, d.p90, d.p99),
            (5, 30, bin(1000), bin(1000))
        );
    }

    /// What `gap_changes` answers, the slow way: every attempt against every other.
    fn gap_changes_naively(
        attempts: &[(DateTime<Utc>, String, bool)],
    ) -> Vec<(usize, Option<i32>, Option<i32>)> {
        let previous = |i: usize, with_new: bool| {
            let (at, handoff, _) = &attempts[i];
            attempts
                .iter()
                .filter(|(t, h, new)| t < at && h != handoff && (with_new || !new))
                .map(|(t, _, _)| *t)
                .max()
        };
        let gap = |i: usize, p: Option<DateTime<Utc>>| {
            p.and_then(|p| gap_hours((attempts[i].0 - p).num_microseconds().unwrap_or(i64::MAX)))
        };
        (0..attempts.len())
            .filter_map(|i| {
                let now = gap(i, previous(i, true));
                let before = if attempts[i].2 {
                    None
                } else {
                    gap(i, previous(i, false))
                };
                (now != before).then_some((i, before, now))
            })
            .collect()
    }

    #[test]
    fn gap_changes_agree_with_comparing_every_pair() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let attempts: Vec<(DateTime<Utc>, String, bool)> = (0..1 + next(12))
                .map(|_| {
                    // Hours apart on a coarse grid, so that ties and handoffs seen twice happen.
                    let at =
                        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::hours(next(40) as i64 * 90);
                    (at, format!("h{}", next(8)), next(3) == 0)
                })
                .collect();
            assert_eq!(
                gap_changes(&attempts),
                gap_changes_naively(&attempts),
                "{attempts:?}"
            );
        }
    }

    #[test]
    fn a_late_earlier_attempt_moves_the_next_ones_gap() {
        let t = |h: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::hours(h);
        // Attempts at 0 h and 30 h were here; one at 20 h arrives.
        let attempts = vec![
            (t(0), "a".to_owned(), false),
            (t(30), "c".to_owned(), false),
            (t(20), "b".to_owned(), true),
        ];
        let changes = gap_changes(&attempts);
        assert_eq!(changes, vec![(1, Some(30), Some(10)), (2, None, Some(20))]);
    }
}
