//! The pure part of the space source: thresholds, and when a watch's warnings change.

use super::{FULL_PERCENT, HYSTERESIS_PERCENT};

/// A subscriber's low-space threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    Percent(u32),
    Bytes(u64),
}

impl Threshold {
    /// The threshold in bytes for a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Threshold::Percent(p) => {
                u64::try_from(u128::from(total) * u128::from(p) / 100).unwrap_or(u64::MAX)
            }
            Threshold::Bytes(b) => b,
        }
    }
}

/// What `statfs` said, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Available to unprivileged users (`f_bavail`).
    pub available: u64,
    /// Free including the root reserve (`f_bfree`).
    pub free: u64,
    pub total: u64,
}

/// Where a watch stands on each level; `None` before the first evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Levels {
    pub low: Option<bool>,
    pub full: Option<bool>,
}

/// One change of one level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Index into [`super::SUBTYPES`].
    pub level: u8,
    pub crossed: bool,
}

/// Pure: the new levels of a watch with `threshold` after `usage`, and the warnings to
/// send. A first evaluation reports only levels that are crossed.
pub fn evaluate(threshold: Threshold, levels: Levels, usage: Usage) -> (Levels, Vec<Transition>) {
    let margin = usage.total / 100 * HYSTERESIS_PERCENT;
    let limit = threshold.bytes(usage.total);
    let low = match levels.low {
        Some(true) => usage.available < limit.saturating_add(margin),
        _ => usage.available < limit,
    };
    let full_limit = usage.total / 100 * FULL_PERCENT;
    let full = match levels.full {
        Some(true) => usage.available < full_limit.saturating_add(margin).max(1),
        _ => usage.available <= full_limit,
    };
    let mut out = Vec::new();
    for (level, old, new) in [(0u8, levels.low, low), (1u8, levels.full, full)] {
        match old {
            Some(old) if old != new => out.push(Transition {
                level,
                crossed: new,
            }),
            None if new => out.push(Transition {
                level,
                crossed: true,
            }),
            _ => {}
        }
    }
    (
        Levels {
            low: Some(low),
            full: Some(full),
        },
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn usage(available: u64) -> Usage {
        Usage {
            available,
            free: available,
            total: 100 * MIB,
        }
    }

    #[test]
    fn a_threshold_is_reported_once_crossed_and_once_cleared_with_hysteresis() {
        let t = Threshold::Percent(20);
        let (levels, out) = evaluate(t, Levels::default(), usage(50 * MIB));
        assert!(
            out.is_empty(),
            "a first look at a healthy filesystem says nothing"
        );
        let (levels, out) = evaluate(t, levels, usage(19 * MIB));
        assert_eq!(
            out,
            vec![Transition {
                level: 0,
                crossed: true
            }]
        );
        let (levels, out) = evaluate(t, levels, usage(10 * MIB));
        assert!(out.is_empty(), "still low: nothing new");
        // Back to just above the threshold: within the hysteresis, still low.
        let (levels, out) = evaluate(t, levels, usage(20 * MIB + 1));
        assert!(out.is_empty());
        let (levels, out) = evaluate(t, levels, usage(30 * MIB));
        assert_eq!(
            out,
            vec![Transition {
                level: 0,
                crossed: false
            }]
        );
        let (_, out) = evaluate(t, levels, usage(0));
        assert_eq!(
            out,
            vec![
                Transition {
                    level: 0,
                    crossed: true
                },
                Transition {
                    level: 1,
                    crossed: true
                }
            ]
        );
    }

    #[test]
    fn a_first_look_at_a_low_filesystem_reports_it_crossed() {
        let (_, out) = evaluate(
            Threshold::Bytes(10 * MIB),
            Levels::default(),
            usage(5 * MIB),
        );
        assert_eq!(
            out,
            vec![Transition {
                level: 0,
                crossed: true
            }]
        );
        assert_eq!(Threshold::Percent(10).bytes(100 * MIB), 10 * MIB);
    }
}
