//! The metadata group's proposals: a placement change (see `crate::placement`) is proposed on
//! the group's leader, reached from any node through the peer protocol
//! ([`PeerRequest::Place`]), and answered once applied.

use std::time::{Duration, Instant};

use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResult;

use super::formation::{leads, HELLO_INTERVAL};
use super::network::{Hosted, PeerNet};
use super::rpc::{PeerRequest, PeerResponse};
use super::types::{node_of, FnResponder, NodeId, C};
use crate::chat::{Command, Outcome};
use crate::placement::{PlacementCommand, META_SHARD};

/// How long one placement proposal may wait for its entry to apply.
pub const PLACE_TTL: Duration = Duration::from_secs(10);

/// What a placement proposal came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Applied: the map's epoch now, and whether this command changed the map.
    Applied { epoch: u64, changed: bool },
    /// The map refused the command (an unknown shard, a node that is not a voter…).
    Refused(String),
}

/// The leader's side: proposes `command` on the hosted metadata group and waits until it is
/// applied. Answers `NotLeader` when this replica does not lead the group.
pub async fn propose(h: &Hosted, command: PlacementCommand) -> PeerResponse {
    if let Err(answer) = leads(h) {
        return answer;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let responder = FnResponder::new(move |result: ClientWriteResult<C>| {
        let _ = tx.send(result);
    });
    if let Err(e) = h.raft.client_write_ff(Command::Place(command), Some(responder)).await {
        return PeerResponse::Error(format!("the metadata group stopped: {e}"));
    }
    match tokio::time::timeout(PLACE_TTL, rx).await {
        Err(_) => PeerResponse::Error(format!("the placement change did not commit within {PLACE_TTL:?}")),
        Ok(Err(_)) => PeerResponse::Error("the metadata group stopped before the change applied".into()),
        Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => {
            PeerResponse::NotLeader { leader: f.leader_id.map(node_of) }
        }
        Ok(Ok(Err(e))) => PeerResponse::Error(format!("proposing the placement change: {e}")),
        Ok(Ok(Ok(resp))) => match resp.data {
            Outcome::Placed { epoch, changed } => PeerResponse::Placed { epoch, changed },
            Outcome::Rejected { reason } => PeerResponse::PlacementRefused(reason.to_string()),
            other => PeerResponse::Error(format!("unexpected outcome of a placement change: {other:?}")),
        },
    }
}

/// Proposes `command` on the metadata group's leader, wherever it is: this node's replica
/// (`local`) when it leads, else the leader its `NotLeader` answers name, else each node in
/// turn, until `deadline`. An `Err` says why no answer came.
pub async fn place(
    net: &PeerNet,
    me: NodeId,
    local: Option<&Hosted>,
    nodes: &[NodeId],
    command: PlacementCommand,
    deadline: Instant,
) -> Result<Placed, String> {
    let mut hint: Option<NodeId> = local.and_then(|h| super::metrics_of(&h.raft).current_leader.map(node_of));
    let mut round = 0usize;
    let mut last = String::from("no node answered");
    while Instant::now() < deadline {
        let target = hint.take().unwrap_or(nodes[round % nodes.len()]);
        round += 1;
        let answer = match local {
            Some(h) if target == me => propose(h, command.clone()).await,
            _ => {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                match net.control(target, PeerRequest::Place(command.clone()), left.min(PLACE_TTL)).await {
                    Ok(answer) => answer,
                    Err(e) => PeerResponse::Error(format!("node {target}: {e}")),
                }
            }
        };
        match answer {
            PeerResponse::Placed { epoch, changed } => return Ok(Placed::Applied { epoch, changed }),
            PeerResponse::PlacementRefused(why) => return Ok(Placed::Refused(why)),
            PeerResponse::NotLeader { leader } => {
                last = format!("node {target} does not lead the metadata group");
                hint = leader.filter(|&l| l != target);
            }
            PeerResponse::Error(e) => last = e,
            other => last = format!("node {target} answered {other:?}"),
        }
        if hint.is_none() && round % nodes.len() == 0 {
            tokio::time::sleep(HELLO_INTERVAL).await;
        }
    }
    Err(format!("no leader of the metadata group (group {META_SHARD}) took the change in time: {last}"))
}
