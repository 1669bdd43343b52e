//! Logging through `tracing`: to the journal when stderr is connected to it (as under
//! systemd), to stderr otherwise. `RUST_LOG` or `--log-level` choose the level.

use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Whether stderr is the journal's stream, as systemd documents for `$JOURNAL_STREAM`.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// At most [`LogLimit::BURST`] messages per [`LogLimit::INTERVAL`]; the first message
/// after a quiet spell says how many were suppressed. A flood of failing events costs a
/// few log lines, never a flood of them.
#[derive(Debug, Default)]
pub struct LogLimit {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimit {
    pub const BURST: u32 = 5;
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// Whether to log now; when yes, how many messages were suppressed before this one.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= Self::INTERVAL);
        if fresh {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// [`LogLimit::allow`] now, for a limit shared between threads.
    pub fn allow_shared(limit: &std::sync::Mutex<Self>) -> Option<u64> {
        limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .allow(Instant::now())
    }

    /// The note to append to a message allowed after `suppressed` others.
    pub fn note(suppressed: u64) -> String {
        if suppressed == 0 {
            String::new()
        } else {
            format!(" ({suppressed} similar messages suppressed)")
        }
    }
}

/// A [`LogLimit`] for messages that report a count (events dropped): what suppressed
/// messages would have reported is carried into the next allowed one, so the figures in
/// the log add up to every event counted.
#[derive(Debug, Default)]
pub struct CountLimit {
    limit: LogLimit,
    unlogged: u64,
}

impl CountLimit {
    /// Counts `count` more; when a message may be logged now, the count since the last
    /// logged one and how many messages were suppressed in between.
    pub fn add(&mut self, count: u64, now: Instant) -> Option<(u64, u64)> {
        self.unlogged += count;
        let suppressed = self.limit.allow(now)?;
        Some((std::mem::take(&mut self.unlogged), suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_suppressed_messages_reach_the_next_allowed_one() {
        let mut drops = CountLimit::default();
        let start = Instant::now();
        let logged: Vec<_> = (0..8)
            .filter_map(|i| drops.add(10, start + Duration::from_millis(i)))
            .collect();
        assert_eq!(logged, vec![(10, 0); LogLimit::BURST as usize]);
        assert_eq!(
            drops.add(1, start + LogLimit::INTERVAL + Duration::from_secs(1)),
            Some((31, 3))
        );
    }

    #[test]
    fn a_flood_is_logged_a_few_times_then_counted() {
        let mut limit = LogLimit::default();
        let start = Instant::now();
        let allowed = (0..1000)
            .filter(|i| limit.allow(start + Duration::from_millis(*i)).is_some())
            .count();
        assert_eq!(allowed, LogLimit::BURST as usize);
        assert_eq!(
            limit.allow(start + LogLimit::INTERVAL + Duration::from_secs(1)),
            Some(1000 - u64::from(LogLimit::BURST))
        );
        assert_eq!(
            limit.allow(start + LogLimit::INTERVAL + Duration::from_secs(2)),
            Some(0)
        );
    }
}
