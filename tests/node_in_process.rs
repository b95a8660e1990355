//! A node run inside the test process through `convoy::node::run`, stopped by the shutdown
//! future it was given: the shape tests use when they need no separate process, and the
//! proof that stopping releases the store (RocksDB's lock) so the same data directory opens
//! again with everything it acknowledged.

use std::time::Duration;

use convoy::client::Client;
use convoy::config::Config;
use tokio::sync::oneshot;

/// Longest a stop may take before the test calls it hung.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// A one-node cluster file (every shard's only voter) on free loopback ports.
fn one_node_config(dir: &std::path::Path) -> Config {
    let port = || testkit::free_port().expect("a free UDP port");
    let text = format!(
        "shards = 2\nreplication_factor = 1\ntls_dir = \"tls\"\n[[nodes]]\nid = 1\n\
         client_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\ndata_dir = \"node1\"\n",
        port(),
        port()
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write cluster.toml");
    Config::load(&path).expect("a valid one-node config")
}

/// Runs node 1 on a task; dropping or firing the returned sender stops it.
fn spawn_node(config: &Config) -> (oneshot::Sender<()>, tokio::task::JoinHandle<convoy::Result<()>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    (stop, tokio::spawn(convoy::node::run(config.clone(), 1, false, shutdown)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_process_stops_on_its_shutdown_future_and_reopens_with_what_it_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = one_node_config(dir.path());
    convoy::net::tls::init(&config).expect("tls material");
    convoy::net::tls::ensure_user(&config, "alice", false).expect("alice's credential");

    let (stop, running) = spawn_node(&config);
    let client = Client::connect_user(&config, "alice").expect("client");
    // The client retries until its deadline while the lone voter elects itself.
    let ack = client.send("room", "hello").await.expect("acked by the one-node cluster");
    assert_eq!((ack.offset, ack.duplicate), (1, false));
    stop.send(()).expect("the node is still running");
    let ended = tokio::time::timeout(STOP_WITHIN, running).await.expect("stopped in time");
    ended.expect("the node task did not panic").expect("run returned Ok after its shutdown");

    // The sockets are released once the endpoints' last handles drop, just after `run`
    // returns: wait until both ports bind again (as a new process would find them).
    let node = config.node(1).expect("node 1").clone();
    for addr in [node.client_addr, node.peer_addr] {
        testkit::eventually(Duration::from_secs(10), "the node's ports to be free again", || async move {
            std::net::UdpSocket::bind(addr).ok().map(drop)
        })
        .await
        .expect("the stopped node's sockets are released");
    }

    // The store was released: the same directory opens again and holds the acked message.
    let (stop, running) = spawn_node(&config);
    let client = Client::connect_user(&config, "alice").expect("client");
    let read = testkit::eventually(Duration::from_secs(30), "the reopened node to serve reads", || async {
        if running.is_finished() {
            return Some(Vec::new());
        }
        client.read("room", 1, Some(1)).await.ok().map(|r| r.messages).filter(|m| !m.is_empty())
    })
    .await
    .expect("the reopened node serves the conversation");
    if running.is_finished() {
        panic!("the reopened node stopped by itself: {:?}", running.await);
    }
    assert_eq!(read.len(), 1);
    assert_eq!((read[0].offset, read[0].sender.as_str(), read[0].text.as_str()), (1, "alice", "hello"));
    stop.send(()).expect("the node is still running");
    let ended = tokio::time::timeout(STOP_WITHIN, running).await.expect("stopped in time");
    ended.expect("the node task did not panic").expect("run returned Ok after its shutdown");
}
