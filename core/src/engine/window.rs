//! Sliding windows in time buckets.
//!
//! A window of length `W` is kept as buckets of width `g = W / 32` (rounded
//! down to whole seconds when `W ≥ 32 s`). An event at time `t` is inside the
//! window at `now` iff its bucket is one of the last `n = ceil(W / g)` buckets
//! up to `now`'s: `floor(t/g) > floor(now/g) − n`. So the window covers
//! more than `n·g − g` and at most `n·g` of time: between `W − g` and `W`
//! when `g` divides `W`, else up to `g` past `W` (`n·g − W < g`; bucket
//! granularity ≈ 3 % of the window);
//! events ahead of `now` (clock skew) count too. Updating is O(1) per event
//! and reading a window merges at most `n + 1` buckets; no event is rescanned.

use serde::{Deserialize, Serialize};

/// Buckets per window.
pub const BUCKETS: i64 = 32;

/// The bucket geometry of one window length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub width_ms: i64,
    pub buckets: i64,
}

impl Window {
    pub fn new(window_ms: i64) -> Window {
        let mut width = (window_ms / BUCKETS).max(1);
        if width >= 1_000 {
            width -= width % 1_000;
        }
        let buckets = (window_ms + width - 1) / width;
        Window { width_ms: width, buckets }
    }

    pub fn bucket_of(&self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.width_ms)
    }

    /// The newest bucket index that is already outside the window at `now`.
    pub fn horizon(&self, now_ms: i64) -> i64 {
        self.bucket_of(now_ms) - self.buckets
    }

    pub fn contains(&self, t_ms: i64, now_ms: i64) -> bool {
        self.bucket_of(t_ms) > self.horizon(now_ms)
    }

    /// The moment bucket `b` leaves the window.
    pub fn leaves_at(&self, b: i64) -> i64 {
        (b + self.buckets).saturating_mul(self.width_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::{DAY_MS, HOUR_MS};

    #[test]
    fn seven_day_window_geometry() {
        let w = Window::new(7 * DAY_MS);
        assert_eq!((w.width_ms, w.buckets), (18_900_000, 32));
        // Every whole number of days divides into 32 whole-second buckets.
        let w = Window::new(390 * DAY_MS);
        assert_eq!((w.width_ms, w.buckets), (1_053_000_000, 32));
        // An hour does not (docs/tag-language.md): 33 buckets of 112 s,
        // covering up to 96 s past the hour.
        let w = Window::new(HOUR_MS);
        assert_eq!((w.width_ms, w.buckets), (112_000, 33));
        assert_eq!(w.width_ms * w.buckets - HOUR_MS, 96_000);
    }

    #[test]
    fn edges_are_bucket_aligned() {
        let w = Window::new(32 * HOUR_MS); // one bucket per hour
        assert_eq!((w.width_ms, w.buckets), (HOUR_MS, 32));
        let now = 100 * HOUR_MS + 10;
        // The oldest bucket inside: hour 69 (100 - 32 + 1).
        assert!(w.contains(69 * HOUR_MS, now));
        assert!(!w.contains(69 * HOUR_MS - 1, now));
        // It leaves exactly when `now` reaches hour 101.
        assert_eq!(w.leaves_at(w.bucket_of(69 * HOUR_MS)), 101 * HOUR_MS);
        assert!(!w.contains(69 * HOUR_MS, 101 * HOUR_MS));
        assert!(w.contains(69 * HOUR_MS, 101 * HOUR_MS - 1));
        // Events ahead of now count.
        assert!(w.contains(now + HOUR_MS, now));
    }

    #[test]
    fn tiny_and_odd_windows() {
        let w = Window::new(10);
        assert_eq!((w.width_ms, w.buckets), (1, 10));
        let w = Window::new(61_000);
        assert!(w.width_ms * w.buckets >= 61_000);
        assert!(w.width_ms * (w.buckets - 1) < 61_000);
    }
}
