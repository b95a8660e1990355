//! A node's start and stop: open the store, bind the peer and client endpoints (separate, so
//! client load cannot starve Raft), start the shard groups, serve peers and clients, and on
//! shutdown stop in the reverse order.
//!
//! [`run`] takes the shutdown as a future (a signal in the binary, a channel in a test), as
//! mini-redis's server does; [`Node::start`] and [`Node::stop`] are the same two halves for a
//! caller that holds the node in between. Stopping needs no flush: everything acknowledged
//! is already durable. Stopping the groups releases the store so RocksDB closes before the
//! process exits.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics;
use crate::net::quic::PEER_STREAMS_MAX;
use crate::net::tls::{self, Link};
use crate::raft::formation::{self, Formation, Start};
use crate::raft::network::{self, Groups, PeerContext, PeerNet};
use crate::raft::quiesce::Quiescer;
use crate::raft::types::NodeId;
use crate::server;
use crate::service::rates::{Keyed, Rate};
use crate::service::{PeerShared, Service};
use crate::store::Store;

/// A node's log filter unless `CONVOY_LOG` says otherwise. openraft logs a warning for every
/// heartbeat that fails: while a peer is down, one line per group led here with a replica
/// there, every heartbeat interval (1,411 lines over three nodes in a 120 s run of
/// `scripts/jepsen --faults stop`). A peer's outage is logged
/// once instead (`raft::quiesce`: lost, then beating again), and openraft's other warnings
/// (replication, votes) stay.
pub const LOG_DEFAULT: &str = "info,openraft=warn,openraft::core::heartbeat=error";

/// Longest a stop waits for an endpoint's connections to finish closing. Each connection's
/// close is sent at once; the wait only answers stray packets with it again, for three probe
/// timeouts. A connection still in its handshake (a dial to a peer that is down) has no
/// round-trip sample, so its probe timeout is about a second and its close would take three:
/// a node stopped after a peer waited that long for nothing.
pub const ENDPOINT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A running node.
pub struct Node {
    pub id: NodeId,
    pub service: Arc<Service>,
    client_endpoint: quinn::Endpoint,
    peer_endpoint: quinn::Endpoint,
    /// Tells the client server to stop accepting.
    stop_tx: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    /// The metrics endpoint, when `metrics_addr` is set.
    metrics: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens storage, binds both endpoints, settles the node's place in the cluster (see
    /// `raft::formation`), starts every shard group and serves peers and clients until
    /// [`Node::stop`]. With `rejoin`, a node without state joins every group as new replicas;
    /// without it, such a node refuses to start (`Error::Refused`).
    pub async fn start(config: Config, id: NodeId, rejoin: bool) -> Result<Node> {
        crate::planted::announce();
        let me = config.node(id)?.clone();
        let paths = tls::node_material(&config, id)?;
        // A revocation list that does not read would let its credentials in: refuse to start.
        // The server starts from this list.
        let revoked = tls::RevocationList::open(paths.revoked())?;
        // A node whose own key is revoked would be refused by every peer.
        let own = tls::node_key_fingerprint(&paths, id)?;
        if revoked.keys().contains(&own) {
            return Err(Error::Refused(format!(
                "node {id}'s certificate (key {own}) is revoked in {}: issue it a new one with `convoy tls init --config \
                 {}` (after deleting {}), then start it again",
                paths.revoked().display(),
                config.path.display(),
                paths.node_dir(id).display()
            )));
        }
        std::fs::create_dir_all(&me.data_dir)?;
        crate::store::space::check_reserve(&me.data_dir, config.limits.disk_free_min_bytes)?;
        let (store, _fresh) = {
            let dir = me.data_dir.join("db");
            let opened = tokio::task::spawn_blocking(move || Store::open(&dir))
                .await
                .map_err(Error::task("opening the store"))?;
            match opened {
                // Damage recovery would not hide (a WAL that does not read back whole, a bad
                // table file): this node must not vote or acknowledge for any shard.
                Err(Error::Storage(e)) if e.kind() == rocksdb::ErrorKind::Corruption => {
                    return Err(Error::Refused(format!(
                        "node {id}'s storage is damaged ({e}); it neither votes nor acknowledges. Rebuild it: \
                         move {} away, then run `convoy node --config {} --id {id} --rejoin` (a majority of \
                         the other nodes must be up)",
                        me.data_dir.join("db").display(),
                        config.path.display()
                    )))
                }
                other => other?,
            }
        };
        store.space.set_min(config.limits.disk_free_min_bytes);
        let spool_dir = me.data_dir.join("spool");
        std::fs::create_dir_all(&spool_dir)?;
        let formation = Formation::load(store.clone(), id)?;

        let metrics_listener = match me.metrics_addr {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let peer_server = tls::server_config(&paths, id, Link::Peer, PEER_STREAMS_MAX)?;
        let peer_endpoint = tls::bind_server(&paths, id, peer_server, me.peer_addr)?;
        let addrs: HashMap<NodeId, SocketAddr> = config.nodes.iter().map(|n| (n.id, n.peer_addr)).collect();
        let append_timeout = Duration::from_millis(config.raft.election_timeout_ms_min);
        let dialer = tls::node_dialer(&paths, id)?;
        let frames = config.raft.append_frames_in_flight;
        let net = PeerNet::new(peer_endpoint.clone(), dialer, addrs, append_timeout, frames, store.stages.clone());
        let registry: Groups = Arc::default();
        net.limit_moves(config.admin.move_bytes_per_s, registry.clone());
        let (drops, drop_requests) = tokio::sync::mpsc::channel(16);
        let quiet = Quiescer::new(
            id,
            Some(Duration::from_millis(config.raft.quiesce_after_ms)).filter(|d| !d.is_zero()),
            Duration::from_millis(config.raft.election_timeout_ms_min),
            Duration::from_millis(config.raft.election_timeout_ms_max),
            registry.clone(),
        );
        net.set_quiescer(quiet.clone());
        let revoked = server::watch_revoked(revoked);
        net.watch_revocations(revoked.clone());
        let l = &config.limits;
        let user_rates = Arc::new(Keyed::shared(Rate::new(l.user_sends_per_s, l.user_sends_burst)));
        let ctx = PeerContext {
            groups: registry.clone(),
            formation: formation.clone(),
            spool_dir,
            space: store.space.clone(),
            snapshot_refusals: Default::default(),
            stages: store.stages.clone(),
            drops,
            quiet: quiet.clone(),
            serving: net.serving(),
            user_sends: {
                let users = user_rates.clone();
                Arc::new(move |taken: &[(String, u32)]| users.debit(taken, std::time::Instant::now()))
            },
            revoked: revoked.clone(),
            refused_keys: Arc::default(),
        };
        let peer_server = tokio::spawn(network::serve(peer_endpoint.clone(), ctx));

        let started = async {
            let start = formation::settle(&formation, &net, &config, rejoin).await?;
            // Conversations map to shards by the shard count: a node that counted otherwise
            // than the cluster would take sends for a conversation into another shard than
            // its peers, with its own offsets and dedup records.
            same_shard_count(&config, &formation.cluster_map()?)?;
            let mut replicas = BTreeMap::new();
            // A node added after formation runs the groups moves placed on it (recorded); a
            // member, every group but those it left.
            // A node rebuilding its replicas rejoins the shards the cluster map places on it.
            let placed = match start {
                Start::Rejoin => {
                    let peers: Vec<NodeId> = config.node_ids().into_iter().filter(|&n| n != id).collect();
                    Some(formation::newest_map(&net, &peers, None).await).filter(|m| m.is_set())
                }
                _ => None,
            };
            if let Some(map) = placed.as_ref() {
                same_shard_count(&config, map)?;
                // A move to this node under way: the learner it ran lost its data with the
                // disk, while the shard's leader still counts what it had acknowledged. Run
                // again empty under that id, it would look caught up and be promoted, and
                // the leaving replica deleted. It is recorded as left instead, so it never
                // starts here again; the move waits until it is cancelled
                // (`convoy admin cancel`), and a new one gives a new replica id.
                let copying = |op: &&crate::placement::Operation| {
                    op.to == id
                        && matches!(op.step, crate::placement::Step::Adding | crate::placement::Step::CatchingUp)
                };
                for op in map.operations.iter().filter(copying) {
                    if let Some(replica) = op.replica {
                        tracing::warn!(
                            shard = op.shard,
                            replica,
                            operation = op.id,
                            "a move to this node was under way when it lost its data: that replica will not run \
                             again; cancel the move (`convoy admin cancel {}`) and move the shard again",
                            op.id
                        );
                        formation::record_left(&store, op.shard, replica)?;
                    }
                }
            }
            for shard in crate::raft::group_ids(&config) {
                if let Some(map) = placed.as_ref() {
                    // Rejoining: only what the map places here (a shard, or the metadata
                    // group); the rest is recorded as left, so no
                    // later start runs it under an id that voted before.
                    // A shard a move is taking off this node is not rebuilt either: the move
                    // removes the replica this node lost, and a rebuilt one beside it would
                    // race the move's membership change and its drop here (which then finds
                    // nothing to delete, and ends the move). Should the move be cancelled
                    // instead, this node stays a voter that runs nothing: the shard is a
                    // replica short until moved off it again (waiting here for the move to
                    // decide could wait for ever: its drops are answered only once the node
                    // runs).
                    let off: Vec<&crate::placement::Operation> =
                        map.operations.iter().filter(|o| o.shard == shard && o.from == id).collect();
                    let leaving = off.iter().flat_map(|o| o.leaving.iter().copied());
                    if let Some(newest) = leaving.max_by_key(|r| crate::raft::types::generation_of(*r)) {
                        formation::record_left(&store, shard, newest)?;
                    }
                    let moving_off = !off.is_empty();
                    let here = !moving_off && map.placement(shard).is_none_or(|p| p.voters.contains(&id));
                    if !here && formation.replica(shard)?.is_none() {
                        formation::record_replica(&store, shard, formation::DROPPED)?;
                    }
                    if !here {
                        continue;
                    }
                }
                let recorded = formation.replica(shard)?;
                if recorded == Some(formation::DROPPED) || (start == Start::Added && recorded.is_none()) {
                    continue;
                }
                if let Some(replica) = formation::replica_for(&formation, &net, &config, shard, start).await? {
                    replicas.insert(shard, replica);
                }
            }
            let service = Service::start(
                config,
                id,
                store,
                net.clone(),
                PeerShared { registry, user_rates },
                &replicas,
                start == Start::Bootstrap,
            )
            .await?;
            service.spawn_background(crate::service::serve_drops(
                std::sync::Arc::downgrade(&service),
                service.stop_signal(),
                drop_requests,
            ));
            if start == Start::Rejoin {
                formation::finish_rejoin(&formation, &net, &service.config).await?;
            }
            Ok::<_, Error>(service)
        };
        let service = match started.await {
            Ok(s) => s,
            Err(e) => {
                peer_endpoint.close(0u32.into(), b"refused");
                peer_server.abort();
                return Err(e);
            }
        };

        let limits = &service.config.limits;
        let client_server = tls::server_config(&paths, id, Link::Client, limits.streams_per_connection_max)?;
        let client_endpoint = tls::bind_server(&paths, id, client_server, me.client_addr)?;
        let (stop_tx, _) = watch::channel(false);
        let stop_signal = || {
            let mut stop_rx = stop_tx.subscribe();
            async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            }
        };
        let beat = Duration::from_millis(service.config.raft.heartbeat_ms);
        tokio::spawn(quiet.run(net.clone(), beat, stop_signal()));
        let metrics = metrics_listener.map(|listener| metrics::serve(service.clone(), listener, stop_signal()));
        let server = tokio::spawn(server::serve(service.clone(), client_endpoint.clone(), revoked, stop_signal()));
        Ok(Node { id, service, client_endpoint, peer_endpoint, stop_tx, server, metrics })
    }

    /// Stops accepting clients, hands the groups it leads to other nodes while its clients are
    /// still connected (their next sends are answered `NotLeader` with the new leader), closes
    /// their connections, stops every group and closes the peer endpoint. Proposals in flight
    /// get no outcome; their clients see it as unknown and retry with the same idempotency key.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        if let Some(metrics) = self.metrics {
            let _ = metrics.await;
        }
        if let Err(e) = self.server.await {
            tracing::warn!(error = %e, "the client server task ended abnormally");
        }
        self.service.hand_leaderships_away().await;
        self.client_endpoint.close(0u32.into(), b"shutdown");
        // Clients were told at the close; what drains is their connections' closing state
        // (answering a late packet with the close again), which the groups' shutdown need
        // not wait for.
        tokio::join!(drain(&self.client_endpoint, "client"), self.service.shutdown());
        self.peer_endpoint.close(0u32.into(), b"shutdown");
        drain(&self.peer_endpoint, "peer").await;
    }
}

/// Refuses a configuration whose shard count is not the one `map` was formed with (an unset
/// map, of a node that holds no metadata replica, says nothing).
fn same_shard_count(config: &Config, map: &crate::placement::ClusterMap) -> Result<()> {
    let formed = map.shards.len();
    if map.is_set() && formed != config.shards as usize {
        return Err(Error::Config(format!(
            "the configuration says shards = {}, but this cluster was formed with {formed}: the shard count \
             is fixed when a cluster is formed (conversations map to shards by it), so set shards = {formed}",
            config.shards
        )));
    }
    Ok(())
}

/// Waits, at most [`ENDPOINT_DRAIN_TIMEOUT`], until a closed endpoint's connections are gone:
/// then its socket is released as soon as the last handle drops.
async fn drain(endpoint: &quinn::Endpoint, which: &str) {
    if tokio::time::timeout(ENDPOINT_DRAIN_TIMEOUT, endpoint.wait_idle()).await.is_err() {
        tracing::info!(endpoint = which, "connections still closing after {ENDPOINT_DRAIN_TIMEOUT:?}; stopping anyway");
    }
}

/// Runs node `id` of `config` until `shutdown` completes, then stops it. A shutdown that
/// comes while the node is still starting ends the start where it is (what it wrote is
/// durable or is redone at the next start).
pub async fn run(config: Config, id: NodeId, rejoin: bool, shutdown: impl Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    let node = tokio::select! {
        node = Node::start(config, id, rejoin) => node?,
        () = &mut shutdown => {
            tracing::info!(node = id, "stopped while starting");
            return Ok(());
        }
    };
    tracing::info!(node = id, "node running");
    shutdown.await;
    tracing::info!(node = id, "stopping");
    node.stop().await;
    Ok(())
}
