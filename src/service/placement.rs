//! Following the cluster map (`crate::placement`) and carrying out its moves.
//!
//! - [`follow`], on every node: learns the nodes' addresses from the map, and starts the
//!   replica a move places here (under the replica id the shard's leader gave it).
//! - [`coordinate`], on the metadata group's leader only: takes each move one recorded step
//!   further. It records a step in the map only once its action is done, and every action
//!   is safe to repeat, so a coordinator that crashes is replaced by the next leader, which
//!   resumes from the last recorded step.
//!
//! A move of shard S from node N to node M:
//!
//! | recorded step | the coordinator's action | then records |
//! |---|---|---|
//! | `adding` | S's leader adds a new replica of M as a learner (`AddLearner`: a generation above every id M had in S) | `catching_up` and the replica id |
//! | `catching_up` | M runs the replica ([`follow`]); S's leader waits until it has caught up, hands leadership away if it is N, then makes it a voter in place of N's (`Replace`, joint consensus) | `removing`: M votes, N does not |
//! | `removing` | N stops its replica and deletes its data (`Drop`) | the move's end |
//! | `cancelling` | the learner leaves S (`RemoveLearner`), M deletes its copy (`Drop`) | the move's end |
//!
//! An acknowledged message is never lost: N's replica votes until M's has caught up and the
//! membership change replacing it is committed, and N deletes its data only after that.
//!
//! The metadata group moves the same way (its group id, `META_SHARD`, in place of S): its own
//! leader answers the shard-leader requests, and when that leader is on N (the coordinator
//! moving itself away) it hands leadership off at the promotion, and the next leader, the
//! next coordinator, finishes the move. [`Service::host`] and [`Service::drop_shard`] start
//! and stop this node's replica of it like a shard's.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::{Service, StopSignal};
use crate::chat::ShardId;
use crate::error::{Error, Result};
use crate::placement::{ClusterMap, NodeState, Operation, PlacementCommand, Step, META_SHARD};
use crate::raft::formation::{self, DROPPED};
use crate::raft::meta;
use crate::raft::network::{DropRequest, Hosted};
use crate::raft::rpc::{PeerRequest, PeerResponse};
use crate::raft::state_machine::ShardEvents;
use crate::raft::types::{generation_of, node_of, Member, NodeId};
use crate::raft::{self as consensus};
use crate::store::codec::decode;
use crate::store::keys::left_key;

/// How often a node looks at the map again, besides when it changes.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);
/// Time allowed for one step's control RPC.
const STEP_TTL: Duration = Duration::from_secs(10);
/// A learner this few entries behind is promoted: the shard's leader then waits for the
/// rest, a moment, before the membership change.
const CATCH_UP_GAP: u64 = 256;
/// Time allowed for a promotion: the leader's wait for the last entries and the change.
const PROMOTE_TTL: Duration = Duration::from_secs(60);

impl Service {
    /// The newest cluster map this node can see: its own replica's of the metadata group,
    /// or, on a node without one (or with one that has not caught up yet), the newest its
    /// peers report, asked at once: a peer that is down does not hold up the others' answers
    /// (see [`formation::MAP_STRAGGLERS`]).
    pub(super) async fn newest_map(&self) -> ClusterMap {
        if self.meta_group().is_some() {
            let map = self.cluster_map();
            if map.is_set() {
                return map;
            }
        }
        let peers: Vec<NodeId> = self.peer_ids();
        let heard = formation::newest_map(&self.net, &peers, Some(formation::MAP_STRAGGLERS)).await;
        let mut fetched = self.fetched_map.lock().unwrap_or_else(|p| p.into_inner());
        if heard.epoch > fetched.epoch {
            *fetched = heard;
        }
        fetched.clone()
    }

    /// Every other node of the file.
    fn peer_ids(&self) -> Vec<NodeId> {
        self.config.node_ids().into_iter().filter(|&n| n != self.id).collect()
    }

    /// This node's replica of group `shard` (a shard's, or the metadata group's), if it
    /// runs one.
    fn hosted(&self, shard: ShardId) -> Option<Hosted> {
        self.registry.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    /// Starts `shard`'s group here as `replica`, unless it runs. The replica id is recorded
    /// first, so a restart runs the group under the same id.
    pub(super) async fn host(&self, shard: ShardId, replica: NodeId) -> Result<()> {
        let _one_at_a_time = self.placement_lock.lock().await;
        // Set under this lock: a replica started here is one `shutdown` stops.
        if self.stopping() {
            return Err(Error::Unavailable("this node is stopping".into()));
        }
        match self.hosted(shard) {
            Some(h) if h.replica == replica => return Ok(()),
            // Another replica of the shard runs here: starting this one would need it gone,
            // and answering that this one runs would let a move wait for it for ever.
            Some(h) => {
                return Err(Error::Unavailable(format!(
                    "this node runs replica {} of shard {shard}, not {replica}: it starts once that one is dropped",
                    h.replica
                )))
            }
            None => {}
        }
        if self.left(shard)?.is_some_and(|l| generation_of(replica) <= generation_of(l)) {
            return Err(Error::Unavailable(format!(
                "replica {replica} of shard {shard} is not newer than one this node deleted; a stale map asked for it"
            )));
        }
        formation::record_replica(&self.store, shard, replica)?;
        let events: std::sync::Arc<dyn ShardEvents> = if shard == META_SHARD {
            std::sync::Arc::new(super::MetaEvents(self.placement.clone(), self.placement_follow.clone()))
        } else {
            // Whatever this node knew of the shard's members is from an earlier replica.
            self.members.reset(shard, self.config.shards);
            std::sync::Arc::new(super::DataEvents {
                push: self.push.clone(),
                members: self.members.clone(),
                shards: self.config.shards,
            })
        };
        let (config, store, net) = (self.raft_config.clone(), self.store.clone(), self.net.clone());
        let group = consensus::start_group(replica, shard, config, store, net, events).await?;
        if shard == META_SHARD {
            let hosted = Hosted { replica, raft: group.raft.clone() };
            self.registry.write().unwrap_or_else(|p| p.into_inner()).insert(shard, hosted);
            *self.meta.write().unwrap_or_else(|p| p.into_inner()) = Some(group);
            tracing::info!(replica, "started a replica of the metadata group the cluster map placed here");
            return Ok(());
        }
        let l = &self.config.limits;
        let proposer = super::Proposer::start(
            shard,
            group.raft.clone(),
            l.shard_window_sends,
            l.conversation_queue_sends,
            self.counters.clone(),
            self.metrics.clone(),
            self.store.stages.clone(),
        );
        let hosted = Hosted { replica, raft: group.raft.clone() };
        self.registry.write().unwrap_or_else(|p| p.into_inner()).insert(shard, hosted);
        self.proposers.write().unwrap_or_else(|p| p.into_inner()).insert(shard, proposer);
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(shard, group);
        tracing::info!(shard, replica, "started a replica the cluster map placed here");
        Ok(())
    }

    /// Records `replica` as the last of `shard` this node left: [`Service::host`] starts no
    /// replica of it that is not newer.
    fn record_left(&self, shard: ShardId, replica: NodeId) -> Result<()> {
        formation::record_left(&self.store, shard, replica)
    }

    /// Records the newest of `replicas` as left, if it is newer than the one recorded.
    fn record_left_newest(&self, shard: ShardId, replicas: &[NodeId]) -> Result<()> {
        if let Some(newest) = replicas.iter().copied().max_by_key(|r| generation_of(*r)) {
            if self.left(shard)?.is_none_or(|l| generation_of(newest) > generation_of(l)) {
                self.record_left(shard, newest)?;
            }
        }
        Ok(())
    }

    /// The last replica id of `shard` this node deleted, if any.
    fn left(&self, shard: ShardId) -> Result<Option<NodeId>> {
        Ok(self.store.db.get(left_key(shard))?.map(|v| decode(&v)).transpose()?)
    }

    /// Stops `shard`'s group here and deletes its data, if the replica here is one of
    /// `replicas`: the shard's membership no longer holds it (the caller, the coordinator,
    /// saw the change committed). A request naming other replicas (a stale coordinator's,
    /// about an earlier replica) is refused. Recorded as [`DROPPED`] and as left first, so a
    /// restart does not run the group again, nor anything stale start it.
    pub(super) async fn drop_shard(&self, shard: ShardId, replicas: &[NodeId]) -> Result<()> {
        let _one_at_a_time = self.placement_lock.lock().await;
        if self.stopping() {
            return Err(Error::Unavailable("this node is stopping: ask again once it runs".into()));
        }
        let running = self.hosted(shard).map(|g| g.replica);
        let recorded = formation::Formation::recorded_replica(&self.store, shard)?;
        let here = match (running, recorded) {
            (Some(r), _) => r,
            (None, None) => {
                // Never started here: this node had not yet seen the map that placed it (a
                // cancel can come first). Nothing to delete, but a map this node fetches
                // later may still name it, and must not start it then.
                self.record_left_newest(shard, replicas)?;
                return Ok(());
            }
            (None, Some(DROPPED)) => {
                // Dropped already; the deletion is done again (it is idempotent) in case the
                // first one failed after it was recorded, before its flush: the table files
                // must not go on showing the old replica's applied state (see
                // `Store::delete_shard`). A newer replica this drop names (a cancelled move
                // back here, not started yet) must not start later either.
                self.record_left_newest(shard, replicas)?;
                let store = self.store.clone();
                return tokio::task::spawn_blocking(move || store.delete_shard(shard))
                    .await
                    .map_err(Error::task("deleting a shard's data"))?;
            }
            (None, Some(r)) => r,
        };
        if !replicas.contains(&here) {
            return Err(Error::Unavailable(format!(
                "this node runs replica {here} of shard {shard}, not one of {replicas:?}: refusing to delete it"
            )));
        }
        let group = if shard == META_SHARD {
            // Its map goes with its data: the newest it knows stays as the fetched map, which
            // `follow` keeps fresh from the peers from now on.
            let last = self.cluster_map();
            *self.fetched_map.lock().unwrap_or_else(|p| p.into_inner()) = last;
            self.meta.write().unwrap_or_else(|p| p.into_inner()).take()
        } else {
            self.proposers.write().unwrap_or_else(|p| p.into_inner()).remove(&shard);
            self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&shard)
        };
        self.registry.write().unwrap_or_else(|p| p.into_inner()).remove(&shard);
        if let Some(g) = &group {
            if let Err(e) = g.shutdown().await {
                tracing::warn!(shard, error = %e, "a dropped shard's group did not stop cleanly");
            }
            // Its state machine may still be applying what was queued to it: deleting the data
            // under it would leave those writes behind the deletion, for a later replica of
            // the shard here to find. The placement lock, held meanwhile, keeps a retry from
            // deleting either. A node asked to stop gives up waiting (its shutdown waits for
            // this lock) and keeps the data: the drop is asked again once it runs, and the
            // group does not run then.
            let mut stop_asked = self.stop_asked.subscribe();
            loop {
                tokio::select! {
                    stopped = g.stopped_within(crate::raft::STATE_MACHINE_STOP_WAIT) => {
                        if stopped {
                            break;
                        }
                        tracing::warn!(shard, "a dropped shard's state machine is still applying: its data waits to be deleted");
                    }
                    _ = stop_asked.wait_for(|asked| *asked) => {
                        return Err(Error::Unavailable(format!(
                            "shard {shard}'s state machine is still applying and this node is stopping: its data is \
                             deleted once the node runs again"
                        )));
                    }
                }
            }
        }
        self.record_left(shard, here)?;
        formation::record_replica(&self.store, shard, DROPPED)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.delete_shard(shard))
            .await
            .map_err(Error::task("deleting a shard's data"))??;
        // Its subscribers re-read, and find the shard gone from this node.
        if shard != META_SHARD {
            ShardEvents::reset(&*self.push, shard);
        }
        if group.is_some() {
            let what = crate::placement::group_name(shard);
            tracing::info!(shard, "left {what}: stopped its replica and deleted its data");
        }
        Ok(())
    }
}

/// Whether `node`'s disk is gone (lost) or the node left the cluster: a drop there would
/// never be answered, and nothing it held can vote again.
fn gone(map: &ClusterMap, node: u64) -> bool {
    map.nodes.iter().any(|n| n.id == node && matches!(n.state, NodeState::Lost | NodeState::Removed))
}

/// Answers the peer server's `Drop`s (see `raft::network::PeerContext`).
pub async fn serve_drops(
    node: Weak<Service>,
    mut stop: StopSignal,
    mut requests: tokio::sync::mpsc::Receiver<DropRequest>,
) {
    while let Some(Some((shard, replicas, done))) = stop.unless_stopped(requests.recv()).await {
        let Some(node) = node.upgrade() else { return };
        let _ = done.send(node.drop_shard(shard, &replicas).await.map_err(|e| e.to_string()));
    }
}

/// On every node: learns addresses from the map and starts the replicas moves place here.
pub(super) async fn follow(node: Weak<Service>, mut stop: StopSignal) {
    loop {
        let Some(wake) = node.upgrade().map(|n| n.placement_follow.clone()) else { return };
        if stop.unless_stopped(tokio::time::timeout(FOLLOW_INTERVAL, wake.notified())).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let Some(map) = stop.unless_stopped(node.newest_map()).await else { return };
        for n in &map.nodes {
            if let Ok(addr) = n.peer_addr.parse() {
                if n.id != node.id {
                    node.net.learn(n.id, addr);
                }
            }
        }
        node.net.moves_in_progress(map.operations.iter().filter_map(|op| op.replica.map(|r| (op.shard, r))));
        for op in map.operations.iter().filter(|op| op.to == node.id) {
            // A learner may start empty; a voter (from `Removing` on) only with what it held,
            // never as an empty replica under an id that voted.
            let placed_here = op.step == Step::CatchingUp
                || (op.step == Step::Removing
                    && formation::Formation::recorded_replica(&node.store, op.shard).ok().flatten() == op.replica);
            if let (true, Some(replica)) = (placed_here, op.replica) {
                if let Err(e) = node.host(op.shard, replica).await {
                    tracing::warn!(shard = op.shard, replica, error = %e, "starting a moved replica");
                }
            }
        }
    }
}

/// On the metadata group's leader: takes every move one step further, over and over.
pub(super) async fn coordinate(node: Weak<Service>, mut stop: StopSignal) {
    'rounds: loop {
        if stop.unless_stopped(tokio::time::sleep(FOLLOW_INTERVAL)).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let Some(map) = node.confirmed_map(&mut stop).await else { continue };
        for id in map.operations.iter().map(|op| op.id) {
            if stop.is_set() {
                return;
            }
            // Each step on a map read after its own check: a step can take a minute, and
            // one taken on a map from before it would act on what a newer leader changed
            // since (a cancel, a step it took).
            let Some(map) = node.confirmed_map(&mut stop).await else { continue 'rounds };
            let Some(op) = map.operations.iter().find(|op| op.id == id) else { continue };
            // At most `concurrent_moves` copy data at once (counted on this map: a move
            // started or cancelled earlier in the round counts); the others wait at `adding`.
            let copying = map.operations.iter().filter(|o| o.step != Step::Adding).count();
            if op.step == Step::Adding && copying >= node.config.admin.concurrent_moves {
                continue;
            }
            if let Err(why) = node.advance(&map, op).await {
                tracing::info!(op = op.id, shard = op.shard, step = op.step.as_str(), %why, "a move's step waits");
            }
        }
    }
}

impl Service {
    /// The cluster map, if this node leads the metadata group: leadership confirmed by a
    /// quorum (`ReadIndex`), and the map read after that, so a deposed leader does not act
    /// on a map others have moved past. `None` otherwise, or if the check does not finish
    /// within a step's time.
    async fn confirmed_map(&self, stop: &mut StopSignal) -> Option<ClusterMap> {
        // A node may be given the metadata group by a move, or lose it to one.
        let h = self.meta_hosted()?;
        if consensus::metrics_of(&h.raft).current_leader != Some(h.replica) {
            return None;
        }
        let confirmed = h.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
        match stop.unless_stopped(tokio::time::timeout(STEP_TTL, confirmed)).await {
            Some(Ok(Ok(_))) => Some(self.cluster_map()),
            _ => None,
        }
    }

    /// Carries out `op`'s next action and records the step it reached.
    async fn advance(&self, map: &ClusterMap, op: &Operation) -> std::result::Result<(), String> {
        let member = |node: NodeId| -> std::result::Result<Member, String> {
            let n = map.nodes.iter().find(|n| n.id == node).ok_or_else(|| format!("node {node} is not in the map"))?;
            Ok(Member { peer_addr: n.peer_addr.clone(), client_addr: n.client_addr.clone() })
        };
        let shard = op.shard;
        let voters: Vec<NodeId> = map.placement(shard).map(|p| p.voters.clone()).unwrap_or_default();
        let next = match op.step {
            Step::Adding => {
                // Above every id `to` ever had in the shard whose state was deleted.
                let min_generation = map
                    .placement(shard)
                    .iter()
                    .flat_map(|p| p.retired.iter())
                    .filter(|r| node_of(**r) == op.to)
                    .map(|r| generation_of(*r) + 1)
                    .max()
                    .unwrap_or(0);
                let req = PeerRequest::AddLearner {
                    shard,
                    node: op.to,
                    member: member(op.to)?,
                    from: op.from,
                    min_generation,
                };
                match self.ask_shard_leader(shard, &voters, req, STEP_TTL).await? {
                    PeerResponse::LearnerAdded { replica, leaving } => PlacementCommand::MoveReached {
                        id: op.id,
                        step: Step::CatchingUp,
                        replica: Some(replica),
                        leaving,
                    },
                    other => return Err(format!("adding the learner: {other:?}")),
                }
            }
            Step::CatchingUp => {
                let replica = op.replica.ok_or("no replica id recorded")?;
                // Promoted only once nearly caught up: until then a cancel still stops it.
                let progress = if crate::planted::active(crate::planted::Bug::RemoveBeforeCaughtUp) {
                    PeerResponse::Behind { entries: Some(0) }
                } else {
                    self.ask_shard_leader(shard, &voters, PeerRequest::Progress { shard, replica }, STEP_TTL).await?
                };
                match progress {
                    PeerResponse::Behind { entries: Some(n) } if n <= CATCH_UP_GAP => {}
                    PeerResponse::Behind { entries } => {
                        let behind =
                            entries.map_or("not yet replicated to".to_string(), |n| format!("{n} entries behind"));
                        return Err(format!("the new replica is {behind}"));
                    }
                    other => return Err(format!("asking how far the new replica is: {other:?}")),
                }
                let req = PeerRequest::Replace { shard, from: op.from, replica, member: member(op.to)? };
                match self.ask_shard_leader(shard, &voters, req, PROMOTE_TTL).await? {
                    PeerResponse::Promoted => PlacementCommand::MoveReached {
                        id: op.id,
                        step: Step::Removing,
                        replica: None,
                        leaving: vec![],
                    },
                    other => return Err(format!("promoting the learner: {other:?}")),
                }
            }
            Step::Removing => {
                // A lost node's disk is gone: nothing to delete there, and it may never answer.
                // Its old ids are retired, so they never vote again should it come back.
                if !gone(map, op.from) {
                    self.drop_on(op.from, shard, &op.leaving).await?;
                }
                PlacementCommand::MoveEnded { id: op.id }
            }
            Step::Cancelling => {
                let mut promoted = false;
                // Every learner of `to`, recorded or not (one added by a step the cancel beat).
                let req = PeerRequest::RemoveLearner { shard, node: op.to, replica: op.replica };
                match self.ask_shard_leader(shard, &voters, req, STEP_TTL).await {
                    Ok(PeerResponse::Promoted) => {}
                    // The promotion was committed when the cancel came: it happened.
                    Err(e) if e.contains("votes") => promoted = true,
                    Ok(other) => return Err(format!("removing the learner: {other:?}")),
                    Err(e) => return Err(e),
                }
                if promoted {
                    tracing::warn!(op = op.id, shard, "the cancel came too late: the new replica already votes");
                    PlacementCommand::MoveReached { id: op.id, step: Step::Removing, replica: None, leaving: vec![] }
                } else {
                    // The copy was never a voter; on a node lost meanwhile there is nothing
                    // left to delete, and it may never answer.
                    if !gone(map, op.to) {
                        let copy: Vec<NodeId> = op.replica.into_iter().collect();
                        self.drop_on(op.to, shard, &copy).await?;
                    }
                    PlacementCommand::MoveEnded { id: op.id }
                }
            }
        };
        let Some(h) = self.meta_hosted() else { return Err("no metadata replica here".into()) };
        match meta::propose(&h, next).await {
            PeerResponse::Placed { .. } => {
                self.placement.notify_one();
                self.placement_follow.notify_waiters();
                Ok(())
            }
            PeerResponse::PlacementRefused(why) => Err(why),
            other => Err(format!("recording the step: {other:?}")),
        }
    }

    /// Has `node` stop and delete its replica of `shard`, if it is one of `replicas` (this
    /// node directly).
    async fn drop_on(&self, node: NodeId, shard: ShardId, replicas: &[NodeId]) -> std::result::Result<(), String> {
        if replicas.is_empty() {
            return Ok(());
        }
        if node == self.id {
            return self.drop_shard(shard, replicas).await.map_err(|e| e.to_string());
        }
        let req = PeerRequest::Drop { shard, replicas: replicas.to_vec() };
        match self.net.control(node, req, STEP_TTL).await {
            Ok(PeerResponse::Dropped) => Ok(()),
            Ok(other) => Err(format!("node {node} answered {other:?}")),
            Err(e) => Err(format!("node {node}: {e}")),
        }
    }

    /// Sends `req` to `shard`'s leader: this node's replica when it leads, else the node
    /// the `NotLeader` answers name, else each voter in turn; the first other answer.
    async fn ask_shard_leader(
        &self,
        shard: ShardId,
        voters: &[NodeId],
        req: PeerRequest,
        ttl: Duration,
    ) -> std::result::Result<PeerResponse, String> {
        let deadline = Instant::now() + ttl;
        let local = self.hosted(shard);
        let mut hint = local.as_ref().and_then(|g| consensus::metrics_of(&g.raft).current_leader.map(node_of));
        let mut last = String::from("no voter answered");
        let mut round = 0usize;
        while Instant::now() < deadline && !voters.is_empty() {
            let target = hint.take().unwrap_or(voters[round % voters.len()]);
            round += 1;
            let answer = match &local {
                Some(h) if target == self.id => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, self.answer_locally(h, req.clone())).await {
                        Ok(answer) => answer,
                        Err(_) => PeerResponse::Error(format!("shard {shard}: no answer within {ttl:?}")),
                    }
                }
                _ => {
                    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                    match self.net.control(target, req.clone(), left).await {
                        Ok(a) => a,
                        Err(e) => PeerResponse::Error(format!("node {target}: {e}")),
                    }
                }
            };
            match answer {
                PeerResponse::NotLeader { leader } => {
                    last = format!("node {target} does not lead shard {shard}");
                    hint = leader.filter(|&l| l != target);
                }
                PeerResponse::Error(e) => last = e,
                other => return Ok(other),
            }
            if hint.is_none() && round % voters.len() == 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Err(last)
    }

    /// A shard leader's side of a move's request, for the replica this node runs.
    async fn answer_locally(&self, h: &Hosted, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::AddLearner { shard, node, member, from, min_generation } => {
                formation::add_learner(h, shard, node, member, from, min_generation).await
            }
            PeerRequest::Progress { replica, .. } => formation::progress(h, replica),
            PeerRequest::Replace { shard, from, replica, .. } => formation::replace(h, shard, from, replica).await,
            PeerRequest::RemoveLearner { shard, node, replica } => {
                formation::remove_learner(h, shard, node, replica).await
            }
            other => PeerResponse::Error(format!("not a shard leader's request: {other:?}")),
        }
    }
}
