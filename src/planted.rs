//! Deliberately broken behaviours, so the fault-injection suite (`jepsen/`) can prove that
//! it catches what it claims to catch. Compiled in only with the test-only cargo feature
//! `planted-bugs`, and then active only when `CONVOY_PLANTED_BUG` names one:
//!
//! - `ack-before-fsync`: the group-commit syncer completes a Raft append before the fsync, so
//!   a power failure of a majority loses acknowledged messages;
//! - `skip-dedup`: apply ignores the dedup index, so a retried send appends again.
//!
//! A normal build compiles every check here to `false`.

/// A planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    AckBeforeFsync,
    SkipDedup,
}

/// Whether `bug` is planted in this process.
#[cfg(feature = "planted-bugs")]
pub fn active(bug: Bug) -> bool {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<Option<Bug>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| match std::env::var("CONVOY_PLANTED_BUG").as_deref() {
        Ok("ack-before-fsync") => Some(Bug::AckBeforeFsync),
        Ok("skip-dedup") => Some(Bug::SkipDedup),
        _ => None,
    });
    *chosen == Some(bug)
}

/// Whether `bug` is planted in this process: never, in a normal build.
#[cfg(not(feature = "planted-bugs"))]
pub fn active(_bug: Bug) -> bool {
    false
}
