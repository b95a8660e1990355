//! Deliberately broken behaviours, so the fault-injection suite (`jepsen/`) can prove that
//! it catches what it claims to catch. Compiled in only with the test-only cargo feature
//! `planted-bugs`, and then active only when `CONVOY_PLANTED_BUG` names one:
//!
//! - `ack-before-fsync`: the group-commit syncer completes a Raft append before the fsync, so
//!   a power failure of a majority loses acknowledged messages;
//! - `skip-dedup`: apply ignores the dedup index, so a retried send appends again;
//! - `leader-restore`: the old Raft configuration, openraft's leader restore on, with apply
//!   unsynced and the committed index not persisted;
//! - `tolerate-wal-loss`: the old storage, point-in-time WAL recovery with recycled WAL files,
//!   log reversion allowed and no watermark check, so a damaged WAL tail is cut silently.
//! - `remove-before-caught-up`: a move promotes its new replica, and removes the old one,
//!   without waiting for the new one to catch up.
//!
//! A normal build compiles every check here to `false`.

/// A planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    AckBeforeFsync,
    SkipDedup,
    LeaderRestore,
    TolerateWalLoss,
    RemoveBeforeCaughtUp,
}

impl Bug {
    pub const ALL: [Bug; 5] =
        [Bug::AckBeforeFsync, Bug::SkipDedup, Bug::LeaderRestore, Bug::TolerateWalLoss, Bug::RemoveBeforeCaughtUp];

    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeFsync => "ack-before-fsync",
            Bug::SkipDedup => "skip-dedup",
            Bug::LeaderRestore => "leader-restore",
            Bug::TolerateWalLoss => "tolerate-wal-loss",
            Bug::RemoveBeforeCaughtUp => "remove-before-caught-up",
        }
    }
}

/// Says loudly, at a node's start, which planted bug this process runs with, if any.
pub fn announce() {
    for bug in Bug::ALL {
        if active(bug) {
            let line = "!".repeat(72);
            tracing::error!("{line}");
            tracing::error!("PLANTED BUG `{}` IS ACTIVE: this node is deliberately unsafe (test build)", bug.name());
            tracing::error!("{line}");
            eprintln!("convoy: PLANTED BUG `{}` IS ACTIVE: this node is deliberately unsafe", bug.name());
        }
    }
}

/// Whether `bug` is planted in this process.
#[cfg(feature = "planted-bugs")]
pub fn active(bug: Bug) -> bool {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<Option<Bug>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| {
        let name = std::env::var("CONVOY_PLANTED_BUG").ok()?;
        Bug::ALL.into_iter().find(|b| b.name() == name)
    });
    *chosen == Some(bug)
}

/// Whether `bug` is planted in this process: never, in a normal build.
#[cfg(not(feature = "planted-bugs"))]
pub fn active(_bug: Bug) -> bool {
    false
}
