//! How a node's background work ends before its groups stop.
//!
//! A stopped openraft group answers every call with an error and logs it at ERROR level, so
//! nothing may call a group once it is stopping. [`crate::service::Service::shutdown`] sets
//! the node's [`StopSignal`] first; the background loops (placement, balancing, retention,
//! compaction) end at their next wait or call, and it waits for them before it stops a
//! group.

use std::future::Future;

use tokio::sync::watch;

/// Seen by the node's background loops: set once the node stops.
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// The signal `stop` sets (`true`: the node is stopping).
    pub fn of(stop: &watch::Sender<bool>) -> StopSignal {
        StopSignal(stop.subscribe())
    }

    /// Whether the node is stopping (a dropped sender counts as stopped).
    pub fn is_set(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Runs `work` unless the node stops first: `None` once it is stopping, and `work` is
    /// dropped where it waits. Only for work that may be abandoned at any await point, as a
    /// crash would abandon it: a wait, a read, a step that is redone after a restart.
    pub async fn unless_stopped<F: Future>(&mut self, work: F) -> Option<F::Output> {
        if self.is_set() {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.0.wait_for(|stopping| *stopping) => None,
            out = work => Some(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_the_node_stops_and_work_after_it_never_starts() {
        let tx = watch::channel(false).0;
        let mut stop = StopSignal::of(&tx);
        assert_eq!(stop.unless_stopped(async { 7 }).await, Some(7), "work runs while the node runs");
        assert!(!stop.is_set());

        let mut waiting = stop.clone();
        let long =
            tokio::spawn(async move { waiting.unless_stopped(tokio::time::sleep(Duration::from_secs(3600))).await });
        tokio::task::yield_now().await;
        tx.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), long).await.expect("the wait ends").expect("no panic");
        assert_eq!(ended, None, "a wait in progress is dropped");

        assert!(stop.is_set());
        let mut ran = false;
        assert_eq!(stop.unless_stopped(async { ran = true }).await, None);
        assert!(!ran, "work is not started once the node is stopping");
    }

    #[tokio::test]
    async fn a_dropped_sender_counts_as_stopped() {
        let tx = watch::channel(false).0;
        let mut stop = StopSignal::of(&tx);
        drop(tx);
        assert!(stop.is_set());
        assert_eq!(stop.unless_stopped(async { 1 }).await, None);
    }
}
