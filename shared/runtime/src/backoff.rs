//! Waiting between tries, the same way everywhere: a wait that doubles from `base` up to `max`,
//! and, where many waiters could retry in step (replicas, endpoints failing together), a random
//! point between that wait and half again (never sooner than the wait itself, and never past
//! `max`).

use std::time::Duration;

/// Doubling waits from `base` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The wait before retry `retry` (0: the first): `base`, twice it, four times, … at most `max`.
    pub fn delay(&self, retry: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << retry.min(20))
            .min(self.max)
    }

    /// [`Backoff::delay`] and up to half again, at random, at most `max`.
    pub fn jittered(&self, retry: u32) -> Duration {
        jittered(self.delay(retry)).min(self.max)
    }
}

/// `wait` and up to half again, at random.
pub fn jittered(wait: Duration) -> Duration {
    let mut bytes = [0u8; 2];
    let fraction = match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    wait + wait.mul_f64(fraction / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_max_and_jitter_stays_within_half_again() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<u128> = (0..6).map(|r| backoff.delay(r).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        for retry in 0..40 {
            let (wait, jittered) = (backoff.delay(retry), backoff.jittered(retry));
            assert!(
                jittered >= wait && jittered <= wait.mul_f64(1.5).min(backoff.max),
                "{retry}: {jittered:?}"
            );
        }
    }
}
