//! Move steps against a real group:
//! - a membership change that its leader left in joint consensus (the joint entry committed,
//!   the uniform one never proposed, as when the leader loses leadership between the two) is
//!   finished by the next move step that finds it: openraft leaves it as it is, and every
//!   move of the shard would otherwise wait for ever;
//! - a promotion (`Replace`) of a learner that a cancel removed, asked before or while it
//!   waits for the learner to catch up, is refused and does not add the learner back;
//! - a stale cancel's learner removal spares the learner of a node that votes in the group
//!   (a rejoin's), whose promotion still goes through, and removes a move's;
//! - a move off a node that is rejoining takes the rejoin's learner with it (it is among
//!   the move's `leaving`, and leaves the group at the promotion), and the rejoin's
//!   `Promote` is then refused for good (`NotRejoined`), as is one in a shard whose node
//!   holds no voter, with nothing proposed; a late repeat of the move's `Replace` changes
//!   nothing (a new move back's learner stays);
//! - a rejoin's `Join` where its node holds no voter (none, or only a learner, which the
//!   refusal names) is refused for good, with nothing added; where it does, it gets a
//!   learner under the next generation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::snapshot_install_tests::{open_store, start, Dirs, Router};
use crate::chat::ShardId;
use crate::raft::formation;
use crate::raft::network::Hosted;
use crate::raft::rpc::PeerResponse;
use crate::raft::types::{replica_id, Member, NodeId, Raft};

const SHARD: ShardId = 5;
const TIMEOUT: Duration = Duration::from_secs(20);

fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

/// Four in-process replicas of one group, voters {1,2,3} led by 1 with all committed, and
/// replica 4 running outside the membership.
struct Group {
    _dir: tempfile::TempDir,
    router: Router,
    rafts: BTreeMap<NodeId, Raft>,
}

impl Group {
    async fn start() -> Group {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = Router::default();
        let mut rafts: BTreeMap<NodeId, Raft> = BTreeMap::new();
        for id in 1..=4 {
            let dirs = Dirs::under(dir.path(), id);
            let store = open_store(&dirs.db).await;
            rafts.insert(id, start(&router, id, &dirs, store).await);
        }
        let leader = &rafts[&1];
        leader
            .initialize(BTreeMap::from([(1, Member::default()), (2, Member::default()), (3, Member::default())]))
            .await
            .expect("initialize");
        let settled = |m: &openraft::RaftMetrics<crate::raft::types::C>| {
            m.current_leader == Some(1)
                && m.last_applied.map(|l| l.index) == m.last_log_index
                && m.membership_config.log_id() == m.committed_membership_config.log_id()
        };
        leader.wait(Some(TIMEOUT)).metrics(settled, "node 1 leads, all committed").await.expect("leader");
        Group { _dir: dir, router, rafts }
    }

    /// Waits until node 1's metrics show a settled membership (committed, as last
    /// appended) holding `replica`: a change's call returns before its metrics say so.
    async fn settled_with(&self, replica: NodeId) {
        self.settled(replica, true).await
    }

    /// As [`Group::settled_with`], for a membership without `replica`: a removal's call
    /// can return before node 1's metrics show its change committed, and a move step
    /// asked in between is answered "asking again".
    async fn settled_without(&self, replica: NodeId) {
        self.settled(replica, false).await
    }

    async fn settled(&self, replica: NodeId, holds: bool) {
        let settled = |m: &openraft::RaftMetrics<crate::raft::types::C>| {
            m.membership_config.log_id() == m.committed_membership_config.log_id()
                && m.membership_config.membership().get_node(&replica).is_some() == holds
        };
        self.rafts[&1].wait(Some(TIMEOUT)).metrics(settled, "the membership settled").await.expect("settled");
    }

    async fn stop(self) {
        for raft in self.rafts.values() {
            let _ = raft.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_left_in_joint_consensus_is_finished_by_the_next_step() {
    let group = Group::start().await;
    let leader = group.rafts[&1].clone();
    leader.add_learner(4, Member::default(), true).await.expect("learner 4");
    group.settled_with(4).await;

    // The joint entry of a change from {1,2,3} to {1,2,4}, with no uniform entry after it.
    let observed = crate::raft::metrics_of(&leader).membership_config;
    let nodes: BTreeMap<NodeId, Member> = observed.membership().nodes().map(|(id, n)| (*id, n.clone())).collect();
    let joint = openraft::Membership::new(vec![voters(&[1, 2, 3]), voters(&[1, 2, 4])], nodes).expect("joint");
    let unchanged = openraft::Precondition::LastMembershipLogId { last_membership_log_id: *observed.log_id() };
    leader.append_membership(joint, openraft::EntryPayload::Blank, [unchanged]).await.expect("joint entry");
    let joint_committed = |m: &openraft::RaftMetrics<crate::raft::types::C>| {
        m.committed_membership_config.membership().get_joint_config().len() == 2
    };
    leader
        .wait(Some(TIMEOUT))
        .metrics(joint_committed, "the joint entry committed")
        .await
        .expect("left in joint consensus");

    // A cancel's step (a move's `Replace` goes the same way) finishes the change first, and
    // asks to be asked again.
    let h = Hosted { replica: 1, raft: leader.clone() };
    match formation::remove_learner(&h, SHARD, 9, None).await {
        PeerResponse::Error(e) => assert!(e.contains("finished a membership change left half done"), "{e}"),
        other => panic!("the joint configuration is finished first, got {other:?}"),
    }
    // The change's call can return before the metrics show it committed.
    let finished = |m: &openraft::RaftMetrics<crate::raft::types::C>| {
        m.committed_membership_config.membership().get_joint_config() == &vec![voters(&[1, 2, 4])]
            && m.membership_config.log_id() == m.committed_membership_config.log_id()
    };
    leader
        .wait(Some(TIMEOUT))
        .metrics(finished, "voters {1,2,4}, committed")
        .await
        .expect("the joint configuration was finished");
    // Settled now: the step itself is answered.
    assert!(matches!(formation::remove_learner(&h, SHARD, 9, None).await, PeerResponse::Promoted));
    group.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_of_a_learner_a_cancel_removed_is_refused_and_does_not_add_it_back() {
    let group = Group::start().await;
    let (router, leader) = (&group.router, group.rafts[&1].clone());
    let h = Hosted { replica: 1, raft: leader.clone() };
    let members = |raft: &Raft| -> Vec<NodeId> {
        crate::raft::metrics_of(raft).membership_config.membership().nodes().map(|(id, _)| *id).collect()
    };

    // Asked while it waits: learner 4 is cut off, so it never catches up; the cancel's
    // `RemoveLearner` ends the wait with a refusal, long before the wait's 50 s.
    router.cut(4, true);
    leader.add_learner(4, Member::default(), false).await.expect("learner 4");
    group.settled_with(4).await;
    let promoting = tokio::spawn({
        let h = Hosted { replica: 1, raft: leader.clone() };
        async move { formation::replace(&h, SHARD, 3, 4).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!promoting.is_finished(), "the promotion waits for learner 4 to catch up");
    assert!(matches!(formation::remove_learner(&h, SHARD, 4, Some(4)).await, PeerResponse::Promoted));
    let answer = tokio::time::timeout(TIMEOUT, promoting).await.expect("ended by the cancel").expect("task");
    match answer {
        PeerResponse::Error(e) => assert!(e.contains("no longer a member"), "{e}"),
        other => panic!("a promotion of a removed learner is refused, got {other:?}"),
    }
    assert_eq!(members(&leader), vec![1, 2, 3], "learner 4 was not added back");

    // Asked after it: refused at once, with nothing appended. (openraft's `add_learner`,
    // which the wait used to be, adds a removed learner again.)
    router.cut(4, false);
    group.settled_without(4).await;
    let before = crate::raft::metrics_of(&leader).last_log_index;
    match formation::replace(&h, SHARD, 3, 4).await {
        PeerResponse::Error(e) => assert!(e.contains("no longer a member"), "{e}"),
        other => panic!("a promotion of a removed learner is refused, got {other:?}"),
    }
    assert_eq!(members(&leader), vec![1, 2, 3], "learner 4 was not added back");
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");
    group.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cancel_spares_a_rejoining_nodes_learner_and_removes_a_moves() {
    let group = Group::start().await;
    let leader = group.rafts[&1].clone();
    let h = Hosted { replica: 1, raft: leader.clone() };
    let members = |raft: &Raft| -> BTreeSet<NodeId> {
        crate::raft::metrics_of(raft).membership_config.membership().nodes().map(|(id, _)| *id).collect()
    };

    // Node 3 lost its data and rejoins: a new replica of it, generation 1, learns beside
    // its old voter (replica 3, generation 0), as `Join` adds it.
    let rejoin = replica_id(3, 1);
    let dirs = Dirs::under(group._dir.path(), rejoin);
    let rejoined = start(&group.router, rejoin, &dirs, open_store(&dirs.db).await).await;
    leader.add_learner(rejoin, Member::default(), true).await.expect("the rejoin's learner");
    group.settled_with(rejoin).await;

    // A stale coordinator's cancel of an earlier move to node 3, naming no replica and then
    // an old one: answered done, and nothing is proposed.
    let before = crate::raft::metrics_of(&leader).last_log_index;
    for named in [None, Some(replica_id(3, 7))] {
        match formation::remove_learner(&h, SHARD, 3, named).await {
            PeerResponse::Promoted => {}
            other => panic!("a cancel naming {named:?} is answered done, got {other:?}"),
        }
    }
    assert!(members(&leader).contains(&rejoin), "the rejoin's learner is still a member");
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");

    // So the rejoin finishes: its replica votes in place of node 3's old one.
    match formation::promote(&h, SHARD, rejoin).await {
        PeerResponse::Promoted => {}
        other => panic!("the rejoin's promotion goes through, got {other:?}"),
    }
    let promoted = |m: &openraft::RaftMetrics<crate::raft::types::C>| {
        m.membership_config.log_id() == m.committed_membership_config.log_id()
            && m.membership_config.membership().voter_ids().collect::<BTreeSet<_>>() == voters(&[1, 2, rejoin])
            && m.membership_config.membership().learner_ids().next().is_none()
    };
    leader.wait(Some(TIMEOUT)).metrics(promoted, "voters {1, 2, rejoin}").await.expect("promoted");

    // A cancel still removes a move's learner: node 4 holds no voter.
    leader.add_learner(4, Member::default(), false).await.expect("a move's learner");
    group.settled_with(4).await;
    assert!(matches!(formation::remove_learner(&h, SHARD, 4, None).await, PeerResponse::Promoted));
    group.settled_without(4).await;
    assert_eq!(members(&leader), voters(&[1, 2, rejoin]));

    let _ = rejoined.shutdown().await;
    group.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_off_a_rejoining_node_takes_its_learner_and_its_promotion_is_refused() {
    let group = Group::start().await;
    let leader = group.rafts[&1].clone();
    let h = Hosted { replica: 1, raft: leader.clone() };
    let membership = |raft: &Raft| crate::raft::metrics_of(raft).membership_config.membership().clone();

    // A replica of node 4, which holds no voter here, is never promoted (a rejoin that
    // joined a shard its node never held): refused at once, and nothing is proposed.
    leader.add_learner(4, Member::default(), true).await.expect("learner 4");
    group.settled_with(4).await;
    let before = crate::raft::metrics_of(&leader).last_log_index;
    match formation::promote(&h, SHARD, 4).await {
        PeerResponse::NotRejoined { reason, newest } => {
            assert!(reason.contains("holds no other voter"), "{reason}");
            assert_eq!(newest, Some(4), "the node's learner, to be recorded as left there");
        }
        other => panic!("a replica of a node without a voter is not promoted, got {other:?}"),
    }
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");
    assert!(membership(&leader).learner_ids().any(|l| l == 4), "learner 4 is left as it was");

    // Node 3 rejoins (a learner beside its old voter), and a move takes the shard off node 3
    // to node 4 before the rejoin's promotion.
    let rejoin = replica_id(3, 1);
    let dirs = Dirs::under(group._dir.path(), rejoin);
    let rejoined = start(&group.router, rejoin, &dirs, open_store(&dirs.db).await).await;
    leader.add_learner(rejoin, Member::default(), true).await.expect("the rejoin's learner");
    group.settled_with(rejoin).await;
    match formation::add_learner(&h, SHARD, 4, Member::default(), 3, 0).await {
        PeerResponse::LearnerAdded { replica, leaving } => {
            assert_eq!(replica, 4, "the move adopts node 4's learner");
            assert_eq!(leaving, vec![3, rejoin], "the move leaves node 3's voter and its rejoin's learner");
        }
        other => panic!("the move's learner, got {other:?}"),
    }
    match formation::replace(&h, SHARD, 3, 4).await {
        PeerResponse::Promoted => {}
        other => panic!("the move's promotion, got {other:?}"),
    }
    let moved = |m: &openraft::RaftMetrics<crate::raft::types::C>| {
        m.membership_config.log_id() == m.committed_membership_config.log_id()
            && m.membership_config.membership().nodes().map(|(id, _)| *id).collect::<BTreeSet<_>>()
                == voters(&[1, 2, 4])
    };
    leader.wait(Some(TIMEOUT)).metrics(moved, "members {1, 2, 4}, no learner").await.expect("moved");
    assert_eq!(membership(&leader).voter_ids().collect::<BTreeSet<_>>(), voters(&[1, 2, 4]));

    // The rejoin's promotion now would add a voter beside the move's: refused for good.
    let before = crate::raft::metrics_of(&leader).last_log_index;
    match formation::promote(&h, SHARD, rejoin).await {
        PeerResponse::NotRejoined { reason, newest } => {
            assert!(reason.contains("no longer a member"), "{reason}");
            assert_eq!(newest, None, "node 3 has no replica left in the group");
        }
        other => panic!("the rejoin's promotion after the move is refused, got {other:?}"),
    }
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");
    // Asked again late (a stale coordinator's), after a new move back onto node 3 added its
    // learner: the promotion is done, and that learner stays.
    let back = replica_id(3, 2);
    leader.add_learner(back, Member::default(), false).await.expect("a move back's learner");
    group.settled_with(back).await;
    let before = crate::raft::metrics_of(&leader).last_log_index;
    assert!(matches!(formation::replace(&h, SHARD, 3, 4).await, PeerResponse::Promoted));
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");
    assert!(membership(&leader).learner_ids().any(|l| l == back), "the move back's learner stays");

    let _ = rejoined.shutdown().await;
    group.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_is_refused_where_its_node_holds_no_voter() {
    let group = Group::start().await;
    let leader = group.rafts[&1].clone();
    let h = Hosted { replica: 1, raft: leader.clone() };
    let members = |raft: &Raft| -> BTreeSet<NodeId> {
        crate::raft::metrics_of(raft).membership_config.membership().nodes().map(|(id, _)| *id).collect()
    };

    // Node 4 holds no voter (a rejoin without a map asks every shard): refused, nothing
    // added; and again once it holds a learner (a move to it, under way when it lost its
    // disk), which the refusal names, for the node to record as left.
    let before = crate::raft::metrics_of(&leader).last_log_index;
    match formation::join(&h, SHARD, 4, Member::default()).await {
        PeerResponse::NotRejoined { reason, newest } => {
            assert!(reason.contains("holds no voter"), "{reason}");
            assert_eq!(newest, None);
        }
        other => panic!("a rejoin of a node without a voter is refused, got {other:?}"),
    }
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");
    assert_eq!(members(&leader), voters(&[1, 2, 3]));
    leader.add_learner(4, Member::default(), true).await.expect("a move's learner");
    group.settled_with(4).await;
    let before = crate::raft::metrics_of(&leader).last_log_index;
    match formation::join(&h, SHARD, 4, Member::default()).await {
        PeerResponse::NotRejoined { newest, .. } => assert_eq!(newest, Some(4)),
        other => panic!("a rejoin of a node holding only a learner is refused, got {other:?}"),
    }
    assert_eq!(crate::raft::metrics_of(&leader).last_log_index, before, "nothing was proposed");

    // Node 3 votes: its rejoin learns under generation 1.
    match formation::join(&h, SHARD, 3, Member::default()).await {
        PeerResponse::Joined { replica } => assert_eq!(replica, replica_id(3, 1)),
        other => panic!("node 3's rejoin joins, got {other:?}"),
    }
    group.settled_with(replica_id(3, 1)).await;
    assert_eq!(members(&leader), voters(&[1, 2, 3, 4, replica_id(3, 1)]));
    group.stop().await;
}
