//! Progress figures of a run: the smoothed loss, steps per second and the time left. The clock
//! is the caller's (seconds from any origin), so the browser and the command line measure
//! alike.

use serde::{Deserialize, Serialize};

/// An exponential moving average of the loss with Adam's bias correction, so the first steps
/// show their own mean rather than a value pulled towards 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossAverage {
    /// Weight of the history (0.9: about the last 10 steps).
    pub beta: f64,
    sum: f64,
    count: u64,
}

impl Default for LossAverage {
    fn default() -> Self {
        LossAverage { beta: 0.9, sum: 0.0, count: 0 }
    }
}

impl LossAverage {
    pub fn add(&mut self, loss: f64) {
        self.sum = self.beta * self.sum + (1.0 - self.beta) * loss;
        self.count += 1;
    }

    /// The average (NaN before the first value).
    pub fn value(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.sum / (1.0 - self.beta.powi(self.count.min(i32::MAX as u64) as i32))
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Steps per second over a sliding window of recent steps, and the time left.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    /// (step, seconds) of recent steps, oldest first.
    marks: Vec<(u64, f64)>,
}

/// Steps the rate is measured over.
const WINDOW: usize = 20;

impl Throughput {
    /// Records that `step` steps were done at time `now` (seconds).
    pub fn mark(&mut self, step: u64, now: f64) {
        self.marks.push((step, now));
        if self.marks.len() > WINDOW + 1 {
            self.marks.remove(0);
        }
    }

    /// Steps per second over the window (`None` before two marks).
    pub fn rate(&self) -> Option<f64> {
        let (s0, t0) = *self.marks.first()?;
        let (s1, t1) = *self.marks.last()?;
        (s1 > s0 && t1 > t0).then(|| (s1 - s0) as f64 / (t1 - t0))
    }

    /// Seconds until `total` steps at the current rate.
    pub fn eta(&self, total: u64) -> Option<f64> {
        let (done, _) = *self.marks.last()?;
        self.rate().map(|r| total.saturating_sub(done) as f64 / r)
    }
}

/// `42s`, `3m07s`, `1h02m`.
pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_rate_and_durations() {
        let mut a = LossAverage::default();
        assert!(a.value().is_nan());
        a.add(2.0);
        assert!((a.value() - 2.0).abs() < 1e-12);
        a.add(2.0);
        assert!((a.value() - 2.0).abs() < 1e-12);
        let mut t = Throughput::default();
        assert!(t.rate().is_none());
        t.mark(0, 10.0);
        t.mark(4, 12.0);
        assert_eq!(t.rate(), Some(2.0));
        assert_eq!(t.eta(10), Some(3.0));
        assert_eq!(format_duration(42.4), "42s");
        assert_eq!(format_duration(187.0), "3m07s");
        assert_eq!(format_duration(3720.0), "1h02m");
    }
}
