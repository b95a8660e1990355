//! The `convoy` command: run a node, run the local cluster, and talk to it.
//! `anyhow` lives here (and in test glue) only.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use convoy::admin::Action;
use convoy::chat::Retention;
use convoy::client::{Client, Event, USER_ENV};
use convoy::config::Config;
use convoy::net::tls::{self, Credential, ADMIN_USER};
use convoy::placement::{group_name, ClusterMap, NodeState};
use serde_json::json;

/// jemalloc instead of glibc malloc, whose `_int_malloc`/`_int_free`/`malloc_consolidate` took
/// about a tenth of the nodes' CPU under send load. Alternated with glibc (2026-11-28):
/// 256 senders × 1 conversation median 21.4k against 19.6k msgs/s over six runs each, with
/// first catch-up reads unchanged — the failure mode that had mimalloc reverted.
mod top;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "convoy", version, about = "A replicated, log-based message store for real-time chat")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of the cluster.
    Node {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        id: u64,
        /// Rebuild a node that lost its data: join every shard it votes in as a new replica
        /// (a learner first, a voter in place of the node's old replica once caught up).
        #[arg(long)]
        rejoin: bool,
    },
    /// Run, stop or inspect every node of cluster.toml on this machine.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Operator commands on the whole cluster (an admin credential; default user `admin`).
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Make the cluster's TLS material (an operator command): the CAs in `ca_dir`, a
    /// certificate for every node, and the `admin` credential. Safe to repeat.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// Manage users (an operator command: it needs the client CA key in `ca_dir`).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Create a conversation, show it, or add and remove its members.
    Conversation {
        #[command(subcommand)]
        action: ConversationAction,
    },
    /// Send one message as your user; prints its offset once it is committed.
    Send {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        conversation: String,
        #[command(flatten)]
        who: Who,
        /// Idempotency identity; a retry with the same id and seq returns the same offset.
        #[arg(long)]
        client_id: Option<u64>,
        #[arg(long, requires = "client_id")]
        seq: Option<u64>,
        #[arg(long)]
        json: bool,
        text: String,
    },
    /// Print a conversation from an offset (and keep following with --follow); members only.
    Tail {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        conversation: String,
        #[command(flatten)]
        who: Who,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long)]
        follow: bool,
        /// Read from this replica.
        #[arg(long)]
        node: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Interactive chat: lines typed are sent, incoming messages are shown.
    Chat {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        conversation: String,
        #[command(flatten)]
        who: Who,
    },
    /// A live view of the cluster: nodes, shards and leaders, send rate and p99, follower
    /// and subscriber lag, refreshed each second from every node's status (an admin
    /// credential). `q` quits.
    Top {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[command(flatten)]
        who: Who,
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
        interval_ms: u64,
        /// Print one view (two samples an interval apart) as text and exit.
        #[arg(long)]
        once: bool,
    },
    /// Read or move your read cursor.
    Cursor {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        conversation: String,
        #[command(flatten)]
        who: Who,
        /// Move the cursor forward to this offset (omit to read it).
        #[arg(long)]
        set: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

/// Who a client command acts as.
#[derive(clap::Args, Clone, Debug)]
struct Who {
    /// Act as this user, with its credential in `<tls_dir>/users/NAME` (default: $CONVOY_USER).
    #[arg(long)]
    user: Option<String>,
    /// Use this certificate instead (with --key); the user is the one it names.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

impl Who {
    /// The credential to connect with. A `--user` that is not the user the certificate names
    /// is refused here (and would be refused by the node).
    fn credential(&self, config: &Config, default: Option<&str>) -> Result<Credential> {
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let c = Credential { cert: cert.clone(), key: key.clone() };
            let named = c.user()?;
            if let Some(user) = &self.user {
                if *user != named {
                    bail!("--user {user} does not match the certificate, which names {named:?}");
                }
            }
            return Ok(c);
        }
        let env = std::env::var(USER_ENV).ok().filter(|u| !u.is_empty());
        let Some(user) = self.user.clone().or(env).or(default.map(str::to_string)) else {
            bail!(
                "no user chosen: pass --user NAME or set {USER_ENV} (the operator makes one with `convoy user add NAME`)"
            );
        };
        Ok(Credential::of_user(config, &user)?)
    }

    fn connect(&self, config: &Config, default: Option<&str>) -> Result<Client> {
        let c = self.credential(config, default)?;
        Ok(Client::connect_as(config, &c, rand::random::<u64>() | 1, 1)?)
    }
}

#[derive(Subcommand)]
enum TlsAction {
    /// Make what is missing: CAs, node certificates, the admin credential.
    Init {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Revoke node N's certificate (a leaked key, a host that is gone): every node refuses
    /// peer links presenting it within a second and closes the open ones. Its files are
    /// deleted; `tls init` issues N a new one, read when N restarts.
    RevokeNode {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        node: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Issue NAME's credential into `<tls_dir>/users/NAME/{cert.pem,key.pem}`.
    Add {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        name: String,
        /// May run `cluster status` and admin commands.
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke NAME's credential: every node refuses its certificate within a second and
    /// closes the connections that presented it; its files are deleted, so `user add NAME`
    /// issues a new one. The user's memberships, cursors and messages stay.
    Revoke {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConversationAction {
    /// Create a conversation with you and --members as its members.
    Create {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[command(flatten)]
        who: Who,
        conversation: String,
        /// Comma-separated user names.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add a member (members only).
    Add {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[command(flatten)]
        who: Who,
        conversation: String,
        member: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a member (members only): their reading ends at the current head.
    Remove {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[command(flatten)]
        who: Who,
        conversation: String,
        member: String,
        #[arg(long)]
        json: bool,
    },
    /// Set how much of a conversation is kept (a member, or an admin): its oldest messages
    /// beyond any limit given are deleted, by the shard's leader, within a second or so.
    /// Limits not given take the cluster's default (`[retention]` in cluster.toml).
    SetRetention {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[command(flatten)]
        who: Who,
        conversation: String,
        /// Keep at most this many newest messages.
        #[arg(long)]
        max_messages: Option<u64>,
        /// Keep messages at most this old: 500ms, 90s, 15m, 12h, 30d, 2w.
        #[arg(long, value_parser = parse_duration_arg)]
        max_age: Option<u64>,
        /// Keep at most this many bytes of the newest messages: 4096, 64KiB, 512MiB, 1GB.
        #[arg(long, value_parser = parse_bytes_arg)]
        max_bytes: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Show the members and the head (members only).
    Show {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[command(flatten)]
        who: Who,
        conversation: String,
        #[arg(long)]
        json: bool,
    },
}

/// What every status command takes: the cluster, an admin credential, the output form.
#[derive(clap::Args)]
struct StatusArgs {
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    #[command(flatten)]
    who: Who,
    #[arg(long)]
    json: bool,
}

impl StatusArgs {
    /// A client of the file's nodes with the admin credential (or the one `who` names).
    fn admin_client(&self) -> Result<Client> {
        self.who.connect(&load(&self.config)?, Some(ADMIN_USER))
    }

    /// Prints a cluster-map change's answer: `json` with `--json`, else `text`.
    fn print_placed(&self, json: serde_json::Value, text: &str) {
        if self.json {
            println!("{json}");
        } else {
            println!("{text}");
        }
    }
}

#[derive(Subcommand)]
enum AdminAction {
    /// Nodes (replicas and leaders held), shards (replicas, learners, leader, preferred
    /// leader) and each replica's lag, from every node's status.
    Status(StatusArgs),
    /// Make node N the leader of shard S: recorded in the cluster map as S's preferred
    /// leader, so it holds across failovers and restarts. Leadership moves once N's replica
    /// has the whole log.
    TransferLeader {
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        to: u64,
        /// Wait until N leads S, showing the leader each second; exit non-zero if it does
        /// not within --timeout-s.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
        timeout_s: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Move shard S's replica on node N to node M: M's new replica catches up as a learner,
    /// then votes in place of N's (leadership leaves N first), then N deletes its copy.
    /// Sends go on throughout. The metadata group's leader carries it out, so it survives
    /// this command's end and any node's crash. `--shard metadata` moves the metadata group's
    /// replica the same way.
    Move {
        #[arg(long, value_parser = parse_group_arg)]
        shard: u32,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
        /// Follow the move each second (its step, how far the new replica is behind); exit 0
        /// once it is done, non-zero if it is cancelled or not done within --timeout-s.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
        timeout_s: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Cancel operation OP (see `admin status`), possible until its new replica votes.
    Cancel {
        op: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Empty node N: mark it draining (it takes no new replica) and move every replica it
    /// holds to the active nodes with the fewest (leadership leaves with them).
    Drain {
        node: u64,
        /// Follow the moves until N holds nothing; exit non-zero if that is not so within
        /// --timeout-s.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
        timeout_s: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Even out replicas, then leaders, over the active nodes; prints the plan first.
    Rebalance {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Run the plan in waves (a shard moves once per wave) until nothing is left to
        /// move, then set the leaders and wait for them.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
        timeout_s: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Rebuild the replicas of node N, whose disk was lost. N is marked lost (it takes no
    /// new replica, and its old replica ids never vote again). Then each shard it held
    /// moves to the active node with the fewest replicas, without asking N to delete
    /// anything; or, with --in-place or when no other node can take a shard, N rebuilds
    /// them itself under new ids once it is started with an empty data directory. Refused
    /// while N answers (it still has its data: drain it).
    ReplaceNode {
        node: u64,
        /// Rebuild on N itself (started empty), even where other nodes could take its shards.
        #[arg(long)]
        in_place: bool,
        /// Follow the moves until N holds nothing; exit non-zero if that is not so within
        /// --timeout-s.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
        timeout_s: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Take node N out of the cluster, once it holds no replica (drain it first). Its id is
    /// never taken again.
    RemoveNode {
        node: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Stop draining node N: it is active and takes replicas again. The moves a drain already
    /// made stay made (`convoy admin rebalance` spreads replicas back).
    Recommission {
        node: u64,
        #[command(flatten)]
        status: StatusArgs,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start every node not already running, wait until every shard has a leader.
    Up {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
        timeout_s: u64,
        #[arg(long)]
        json: bool,
    },
    /// Stop the nodes `cluster up` started.
    Down {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show every node's shards and leaders (an admin credential; default user `admin`).
    Status(StatusArgs),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: a node's log is usually a file, which escape codes garble.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn load(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("loading {}", path.display()))
}

/// Exit status of a node that refuses to start (it lost the state its identity needs).
const EXIT_REFUSED: u8 = 3;
/// The longest `--timeout-s` taken: a week. Longer ones would overflow the clock's arithmetic,
/// and no operation here is worth waiting longer for.
const TIMEOUT_S_MAX: u64 = 7 * 24 * 3600;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let is_node = matches!(cli.command, Cmd::Node { .. });
    init_tracing(if is_node { convoy::node::LOG_DEFAULT } else { "warn,openraft=error" });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Cmd::Node { config, .. } = &cli.command {
        // A bad file is reported by `run_node`; only the thread count is needed here.
        if let Ok(c) = Config::load(config) {
            if c.worker_threads > 0 {
                builder.worker_threads(c.worker_threads);
            }
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<convoy::error::Error>() {
                // Refused: a node that must not start as what it was (see `--rejoin`).
                Some(convoy::error::Error::Refused(_)) => std::process::ExitCode::from(EXIT_REFUSED),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Node { config, id, rejoin } => run_node(&config, id, rejoin).await,
        Cmd::Cluster { action } => match action {
            ClusterAction::Up { config, timeout_s, json } => {
                cluster_up(&config, Duration::from_secs(timeout_s), json).await
            }
            ClusterAction::Down { config, json } => cluster_down(&config, json),
            ClusterAction::Status(args) => cluster_status(&args).await,
        },
        Cmd::Admin { action: AdminAction::Status(args) } => admin_status(&args).await,
        Cmd::Admin { action: AdminAction::TransferLeader { shard, to, wait, timeout_s, status } } => {
            transfer_leader(&status, shard, to, wait, Duration::from_secs(timeout_s)).await
        }
        Cmd::Admin { action: AdminAction::Move { shard, from, to, wait, timeout_s, status } } => {
            move_replica(&status, shard, from, to, wait, Duration::from_secs(timeout_s)).await
        }
        Cmd::Admin { action: AdminAction::Drain { node, wait, timeout_s, status } } => {
            drain(&status, node, Emptying::Drain, wait, Duration::from_secs(timeout_s)).await
        }
        Cmd::Admin { action: AdminAction::ReplaceNode { node, in_place, wait, timeout_s, status } } => {
            let how = Emptying::Replace { in_place };
            drain(&status, node, how, wait, Duration::from_secs(timeout_s)).await
        }
        Cmd::Admin { action: AdminAction::Rebalance { dry_run, wait, timeout_s, status } } => {
            rebalance(&status, dry_run, wait, Duration::from_secs(timeout_s)).await
        }
        Cmd::Admin { action: AdminAction::RemoveNode { node, status } } => {
            let (epoch, changed) =
                status.admin_client()?.remove_node(node).await.map_err(|e| anyhow!("remove-node: {e}"))?;
            status.print_placed(
                json!({"node": node, "epoch": epoch, "changed": changed}),
                &format!("node {node} removed from the cluster (cluster map epoch {epoch}); stop its process"),
            );
            Ok(())
        }
        Cmd::Admin { action: AdminAction::Recommission { node, status } } => {
            let (epoch, changed) =
                status.admin_client()?.recommission(node).await.map_err(|e| anyhow!("recommission: {e}"))?;
            let text = if changed { "is active again" } else { "was not draining" };
            status.print_placed(
                json!({"node": node, "epoch": epoch, "changed": changed}),
                &format!("node {node} {text} (cluster map epoch {epoch})"),
            );
            Ok(())
        }
        Cmd::Admin { action: AdminAction::Cancel { op, status } } => {
            let (epoch, changed) =
                status.admin_client()?.cancel_operation(op).await.map_err(|e| anyhow!("cancel: {e}"))?;
            status.print_placed(
                json!({"op": op, "epoch": epoch, "changed": changed}),
                &format!("operation {op}: cancel recorded (cluster map epoch {epoch}); the coordinator undoes it"),
            );
            Ok(())
        }
        Cmd::Tls { action: TlsAction::Init { config } } => {
            let config = load(&config)?;
            let paths = tls::init(&config)?;
            println!(
                "TLS material ready: node and client material in {}, CA keys in {} (keep those to the operator)",
                paths.dir.display(),
                paths.ca_dir.display()
            );
            Ok(())
        }
        Cmd::Tls { action: TlsAction::RevokeNode { config, node, json } } => {
            let config = load(&config)?;
            let r = tls::revoke_node(&config, node)?;
            if json {
                println!("{}", json!({"node": node, "revoked": r.fingerprint, "file": r.file}));
            } else {
                println!(
                    "node {node}: key {} (SHA-256 of its public key) revoked in {}; nodes refuse it within {}s. \
                     `convoy tls init` issues node {node} a new certificate, read when it restarts",
                    r.fingerprint,
                    r.file.display(),
                    convoy::server::REVOKED_RELOAD.as_secs()
                );
            }
            Ok(())
        }
        Cmd::User { action: UserAction::Add { config, name, admin, json } } => {
            let config = load(&config)?;
            let c = tls::add_user(&config, &name, admin)?;
            if json {
                println!("{}", json!({"user": name, "admin": admin, "cert": c.cert, "key": c.key}));
            } else {
                println!("user {name}: certificate {}, key {} (mode 0600)", c.cert.display(), c.key.display());
            }
            Ok(())
        }
        Cmd::User { action: UserAction::Revoke { config, name, json } } => {
            let config = load(&config)?;
            let r = tls::revoke_user(&config, &name)?;
            if json {
                println!("{}", json!({"user": r.user, "revoked": r.fingerprint, "file": r.file}));
            } else {
                println!(
                    "user {}: key {} (SHA-256 of its public key) revoked in {}; nodes refuse it within {}s",
                    r.user,
                    r.fingerprint,
                    r.file.display(),
                    convoy::server::REVOKED_RELOAD.as_secs()
                );
            }
            Ok(())
        }
        Cmd::Conversation { action } => conversation(action).await,
        Cmd::Send { config, conversation, who, client_id, seq, json, text } => {
            let config = load(&config)?;
            let client = match client_id {
                Some(id) => Client::connect_as(&config, &who.credential(&config, None)?, id, seq.unwrap_or(1))?,
                None => who.connect(&config, None)?,
            };
            let ack = client.send(&conversation, &text).await?;
            if json {
                println!(
                    "{}",
                    json!({"conversation": ack.conversation, "offset": ack.offset, "ts_ms": ack.ts_ms, "duplicate": ack.duplicate})
                );
            } else {
                println!("{}", ack.offset);
            }
            Ok(())
        }
        Cmd::Tail { config, conversation, who, from, follow, node, json } => {
            let config = load(&config)?;
            let client = who.connect(&config, None)?;
            if let Some(n) = node {
                config.node(n)?;
            }
            if !follow {
                let read = client.read(&conversation, from, node).await?;
                if let Some(earliest) = read.truncated_before {
                    print_truncated(&conversation, earliest, json);
                }
                for m in &read.messages {
                    print_message(m, json);
                }
                return Ok(());
            }
            let mut sub = client.subscribe(&conversation, from, node);
            while let Some(ev) = sub.next().await {
                match ev {
                    Event::Message(m) => print_message(&m, json),
                    Event::Truncated { earliest } => print_truncated(&conversation, earliest, json),
                    Event::Failed(e) => bail!("{e}"),
                    // On stderr, so that the lag has a reason where the operator looks.
                    Event::Waiting { node, error, retry_in_ms } => {
                        eprintln!("convoy tail: node {node}: {error}; trying again in {retry_in_ms} ms")
                    }
                    Event::CaughtUp { .. } | Event::Attached { .. } => {}
                }
            }
            Ok(())
        }
        Cmd::Top { config, who, interval_ms, once } => {
            let config = load(&config)?;
            let client = who.connect(&config, Some(ADMIN_USER))?;
            let title = config.path.display().to_string();
            top::run(&client, &config.node_ids(), &title, Duration::from_millis(interval_ms), once).await
        }
        Cmd::Chat { config, conversation, who } => {
            let config = load(&config)?;
            chat(&who.connect(&config, None)?, &conversation).await
        }
        Cmd::Cursor { config, conversation, who, set, json } => {
            let config = load(&config)?;
            let client = who.connect(&config, None)?;
            let (offset, head) = match set {
                Some(o) => client.set_cursor(&conversation, o).await?,
                None => client.cursor(&conversation).await?,
            };
            let user = client.user();
            if json {
                println!(
                    "{}",
                    json!({"user": user, "conversation": conversation, "cursor": offset, "head": head, "unread": head.saturating_sub(offset)})
                );
            } else {
                println!("cursor {offset} head {head} unread {}", head.saturating_sub(offset));
            }
            Ok(())
        }
    }
}

/// A shard number, or `metadata` for the metadata group.
fn parse_group_arg(text: &str) -> std::result::Result<u32, String> {
    if text == "metadata" {
        return Ok(convoy::placement::META_SHARD);
    }
    text.parse().map_err(|e| format!("{text:?} is neither a shard number nor `metadata`: {e}"))
}

fn parse_duration_arg(text: &str) -> std::result::Result<u64, String> {
    convoy::config::parse_duration_ms(text).map_err(|e| e.to_string())
}

fn parse_bytes_arg(text: &str) -> std::result::Result<u64, String> {
    convoy::config::parse_bytes(text).map_err(|e| e.to_string())
}

async fn conversation(action: ConversationAction) -> Result<()> {
    let (members, head, json) = match action {
        ConversationAction::SetRetention { config, who, conversation, max_messages, max_age, max_bytes, json } => {
            let config = load(&config)?;
            let retention = Retention { max_messages, max_age_ms: max_age, max_bytes };
            let (set, effective) = who.connect(&config, None)?.set_retention(&conversation, retention).await?;
            let limits = |r: &Retention| json!({"max_messages": r.max_messages, "max_age_ms": r.max_age_ms, "max_bytes": r.max_bytes});
            if json {
                println!(
                    "{}",
                    json!({"conversation": conversation, "set": limits(&set), "effective": limits(&effective)})
                );
            } else {
                println!("retention of {conversation}: {set}; with the cluster's default: {effective}");
            }
            return Ok(());
        }
        ConversationAction::Create { config, who, conversation, members, json } => {
            let config = load(&config)?;
            (who.connect(&config, None)?.create_conversation(&conversation, &members).await?, None, json)
        }
        ConversationAction::Add { config, who, conversation, member, json } => {
            let config = load(&config)?;
            (who.connect(&config, None)?.add_member(&conversation, &member).await?, None, json)
        }
        ConversationAction::Remove { config, who, conversation, member, json } => {
            let config = load(&config)?;
            (who.connect(&config, None)?.remove_member(&conversation, &member).await?, None, json)
        }
        ConversationAction::Show { config, who, conversation, json } => {
            let config = load(&config)?;
            let client = who.connect(&config, None)?;
            let mut last = None;
            let mut found = None;
            for node in client.node_ids() {
                match client.members(node, &conversation).await {
                    Ok(r) => {
                        found = Some(r);
                        break;
                    }
                    Err(e @ convoy::Error::Forbidden(_)) => return Err(e.into()),
                    Err(e) => last = Some(e),
                }
            }
            let (members, head) = match (found, last) {
                (Some(r), _) => r,
                (None, Some(e)) => return Err(e.into()),
                (None, None) => bail!("no nodes"),
            };
            (members, Some(head), json)
        }
    };
    if json {
        println!("{}", json!({"members": members, "head": head}));
    } else {
        println!("members: {}", members.join(", "));
        if let Some(head) = head {
            println!("head: {head}");
        }
    }
    Ok(())
}

/// Says that retention deleted the messages before `earliest`: a JSON line before the
/// messages with `--json` (on stdout, where a program reads them), a notice on stderr
/// otherwise.
fn print_truncated(conversation: &str, earliest: u64, json: bool) {
    if json {
        println!("{}", json!({"conversation": conversation, "truncated_before": earliest}));
    } else {
        eprintln!("note: messages of {conversation} before offset {earliest} were deleted by retention");
    }
}

fn print_message(m: &convoy::chat::StoredMessage, json: bool) {
    if json {
        println!(
            "{}",
            json!({"conversation": m.conversation, "offset": m.offset, "sender": m.sender, "ts_ms": m.ts_ms, "text": m.text})
        );
    } else {
        println!("{:>6}  {}: {}", m.offset, m.sender, m.text);
    }
    let _ = std::io::stdout().flush();
}

async fn run_node(path: &Path, id: u64, rejoin: bool) -> Result<()> {
    let config = load(path)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    convoy::node::run(config, id, rejoin, shutdown).await.with_context(|| format!("node {id}"))
}

fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("node.pid")
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`):
/// with the pid, it names one process, where a pid alone is reused.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `cmdline` (NUL-separated, as `/proc/<pid>/cmdline` gives it) is `convoy node ...
/// --id <id>`: the process `cluster up` started for node `id`.
fn is_node_cmdline(cmdline: &[u8], id: u64) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let id = id.to_string();
    args.get(1) == Some(&&b"node"[..]) && args.windows(2).any(|w| w[0] == b"--id" && w[1] == id.as_bytes())
}

/// The pid file's record of node `id`'s process: its pid and start time.
fn pid_record(pid: u32) -> String {
    match start_ticks(pid) {
        Some(ticks) => format!("{pid} {ticks}\n"),
        None => format!("{pid}\n"),
    }
}

/// The pid `record` names if that process still runs and is node `id`'s: a pid file left
/// from before a reboot or a crash can name a process that reused the pid, which must never
/// be taken for the node (nor signalled by `cluster down`).
fn ours(record: &str, id: u64) -> Option<u32> {
    let mut fields = record.split_whitespace();
    let pid: u32 = fields.next()?.parse().ok()?;
    let ticks: Option<u64> = match fields.next() {
        Some(t) => Some(t.parse().ok()?),
        None => None,
    };
    if !alive(pid) || ticks.is_some_and(|t| start_ticks(pid) != Some(t)) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    is_node_cmdline(&cmdline, id).then_some(pid)
}

fn running_pid(data_dir: &Path, id: u64) -> Option<u32> {
    ours(&std::fs::read_to_string(pid_file(data_dir)).ok()?, id)
}

async fn cluster_up(path: &Path, timeout: Duration, json: bool) -> Result<()> {
    let config = load(path)?;
    tls::init(&config)?;
    let exe = std::env::current_exe().context("locating the convoy binary")?;
    let mut started = Vec::new();
    for n in &config.nodes {
        std::fs::create_dir_all(&n.data_dir)?;
        if let Some(pid) = running_pid(&n.data_dir, n.id) {
            if !json {
                println!("node {} already running (pid {pid})", n.id);
            }
            continue;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(n.data_dir.join("node.log"))?;
        let child = std::process::Command::new(&exe)
            .args(["node", "--config"])
            .arg(&config.path)
            .args(["--id", &n.id.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting node {}", n.id))?;
        std::fs::write(pid_file(&n.data_dir), pid_record(child.id()))?;
        started.push((n.id, child.id()));
        if !json {
            println!("started node {} (pid {}), log {}", n.id, child.id(), n.data_dir.join("node.log").display());
        }
    }
    let client = Client::connect_user(&config, ADMIN_USER)?;
    let deadline = Instant::now() + timeout;
    loop {
        match client.agreed_leaders(&config.node_ids()).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                bail!("cluster not ready after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    if json {
        println!(
            "{}",
            json!({"ready": true, "started": started.iter().map(|(id, pid)| json!({"node": id, "pid": pid})).collect::<Vec<_>>()})
        );
    } else {
        let cfg = config.path.display();
        println!("cluster ready: {} nodes, {} shards, every shard has a leader", config.nodes.len(), config.shards);
        println!("try: target/release/convoy user add alice --config {cfg}, then, in two shells:");
        println!("  target/release/convoy tail --config {cfg} --user alice --conversation general --follow");
        println!("  target/release/convoy send --config {cfg} --user alice --conversation general \"hello\"");
        println!("or chat: target/release/convoy chat --config {cfg} --user alice --conversation general");
    }
    Ok(())
}

fn cluster_down(path: &Path, json: bool) -> Result<()> {
    let config = load(path)?;
    let mut stopped = Vec::new();
    for n in &config.nodes {
        let Some(pid) = running_pid(&n.data_dir, n.id) else {
            let _ = std::fs::remove_file(pid_file(&n.data_dir));
            continue;
        };
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = std::fs::remove_file(pid_file(&n.data_dir));
        stopped.push((n.id, pid));
        if !json {
            println!("stopped node {} (pid {pid})", n.id);
        }
    }
    if json {
        println!(
            "{}",
            json!({"stopped": stopped.iter().map(|(id, pid)| json!({"node": id, "pid": pid})).collect::<Vec<_>>()})
        );
    } else if stopped.is_empty() {
        println!("no node of {} was running", config.path.display());
    }
    Ok(())
}

/// Every node's status, in node order, for `command`: a node that does not answer gives its
/// error; a refusal of the credential ends the command (retrying with it changes nothing).
/// The nodes are asked at once, so the views folded together are of nearly one moment (asked
/// one after another, a shard's leader could be read before a change and the map after it).
async fn node_statuses(
    args: &StatusArgs,
    command: &str,
) -> Result<(Config, Vec<(u64, convoy::Result<convoy::net::wire::NodeStatus>)>)> {
    let config = load(&args.config)?;
    let client = args.who.connect(&config, Some(ADMIN_USER))?;
    let ids = config.node_ids();
    let answers = futures::future::join_all(ids.iter().map(|id| client.status(*id))).await;
    let mut statuses = Vec::new();
    for (id, answer) in ids.into_iter().zip(answers) {
        match answer {
            Err(e @ convoy::Error::Forbidden(_)) => bail!("{e} ({command} needs an admin credential)"),
            answer => statuses.push((id, answer)),
        }
    }
    Ok((config, statuses))
}

async fn cluster_status(args: &StatusArgs) -> Result<()> {
    let json = args.json;
    let (config, statuses) = node_statuses(args, "cluster status").await?;
    let mut out = Vec::new();
    for (id, answer) in statuses {
        match answer {
            Ok(s) => {
                if !json {
                    let leading: Vec<u32> = s.shards.iter().filter(|x| x.leader == Some(id)).map(|x| x.shard).collect();
                    let lag: u64 = s
                        .shards
                        .iter()
                        .map(|x| x.last_log_index.unwrap_or(0).saturating_sub(x.last_applied_index.unwrap_or(0)))
                        .sum();
                    let per_fsync = s.fsync_completions as f64 / s.fsyncs.max(1) as f64;
                    let fsync_ms = s.fsync_us_total as f64 / 1000.0 / s.fsyncs.max(1) as f64;
                    let per_entry = s.sends_committed as f64 / s.entries_committed.max(1) as f64;
                    let carrying = s.append_rpcs.saturating_sub(s.append_rpcs_empty);
                    let per_rpc = s.append_rpc_entries as f64 / carrying.max(1) as f64;
                    let framed = match s.append_frames {
                        0 => String::new(),
                        n => format!(" in {n} frames ({:.1} each)", s.append_rpcs as f64 / n as f64),
                    };
                    println!(
                        "node {id}: up, leads shards {leading:?}, apply lag {lag} entries, \
                         {} fsyncs ({per_fsync:.1} appends each, {fsync_ms:.2} ms mean), \
                         {} sends committed in {} entries ({per_entry:.1} each), \
                         {} AppendEntries sent{framed} ({per_rpc:.1} entries each when not empty, {} empty, \
                         {} cut to fit a frame)",
                        s.fsyncs,
                        s.sends_committed,
                        s.entries_committed,
                        s.append_rpcs,
                        s.append_rpcs_empty,
                        s.append_rpcs_cut
                    );
                    let stages: Vec<String> = s
                        .stages
                        .iter()
                        .filter_map(|st| {
                            let (p50, p99) = (st.quantile_us(0.5)?, st.quantile_us(0.99)?);
                            Some(format!("{} {p50}/{p99} µs ×{}", st.stage, st.count()))
                        })
                        .collect();
                    if !stages.is_empty() {
                        println!("  send path since start, p50/p99: {}", stages.join(", "));
                    }
                    for shard in &s.shards {
                        for f in shard.followers.iter().filter(|f| f.lagging) {
                            println!(
                                "  LAGGING: shard {} follower on node {} is {} entries behind (limits.follower_lag_warn {})",
                                shard.shard, f.node, f.entries, config.limits.follower_lag_warn
                            );
                        }
                    }
                }
                out.push(json!({"node": id, "up": true, "status": s}));
            }
            Err(e) => {
                if !json {
                    println!("node {id}: down ({e})");
                }
                out.push(json!({"node": id, "up": false, "error": e.to_string()}));
            }
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(out));
    }
    Ok(())
}

async fn admin_status(args: &StatusArgs) -> Result<()> {
    let json = args.json;
    let (_, answers) = node_statuses(args, "admin status").await?;
    let statuses: Vec<_> = answers
        .into_iter()
        .map(|(id, answer)| {
            if let (Err(e), false) = (&answer, json) {
                eprintln!("node {id} did not answer: {e}");
            }
            (id, answer.ok())
        })
        .collect();
    let view = convoy::admin::cluster_view(&statuses);
    if json {
        println!("{}", serde_json::to_string(&view)?);
        return Ok(());
    }
    println!("{:>4}  {:<7} {:<5} {:>8} {:>7}", "node", "state", "up", "replicas", "leads");
    for n in &view.nodes {
        println!(
            "{:>4}  {:<7} {:<5} {:>8} {:>7}",
            n.id,
            n.state,
            if n.up { "yes" } else { "no" },
            n.replicas,
            n.leaders
        );
    }
    println!();
    let meta_leader = view.metadata_leader.map_or("none".to_string(), |l| l.to_string());
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let meta_on = view.metadata.as_ref().map_or("?".to_string(), |m| {
        let learners = if m.learners.is_empty() { String::new() } else { format!(" (learners {})", ids(&m.learners)) };
        format!("{}{learners}", ids(&m.replicas))
    });
    println!("cluster map epoch {}, metadata group on nodes {meta_on}, led by node {meta_leader}", view.epoch);
    println!();
    println!(
        "{:>5}  {:>6} {:>9} {:>5}  {:<12} {:<10} lag (node: entries behind the leader / unapplied)",
        "shard", "leader", "preferred", "term", "replicas", "learners"
    );
    for s in &view.shards {
        let lag: Vec<String> = s
            .lag
            .iter()
            .map(|l| {
                let show = |x: Option<u64>| x.map_or("?".to_string(), |x| x.to_string());
                format!("{}: {}/{}", l.node, show(l.entries_behind), show(l.unapplied))
            })
            .collect();
        let leader = s.leader.map_or("none".to_string(), |l| l.to_string());
        let preferred = s.preferred_leader.map_or("-".to_string(), |l| l.to_string());
        println!(
            "{:>5}  {:>6} {:>9} {:>5}  {:<12} {:<10} {}",
            s.shard,
            leader,
            preferred,
            s.term,
            ids(&s.replicas),
            if s.learners.is_empty() { "-".to_string() } else { ids(&s.learners) },
            lag.join("  ")
        );
    }
    if view.operations.is_empty() {
        println!("\noperations in progress: none");
    } else {
        println!("\noperations in progress:");
        for op in &view.operations {
            let behind = op.progress.entries_behind.map_or("?".to_string(), |e| e.to_string());
            println!(
                "  {:>3}  move {} from node {} to node {}: {} (new replica {} entries behind)",
                op.id,
                group_name(op.shard),
                op.from,
                op.to,
                op.state,
                behind
            );
        }
    }
    Ok(())
}

/// The cluster view and the newest map, from every node's status.
async fn view_and_map(args: &StatusArgs, command: &str) -> Result<(convoy::admin::ClusterView, ClusterMap)> {
    let (_, answers) = node_statuses(args, command).await?;
    let statuses: Vec<_> = answers.into_iter().map(|(id, a)| (id, a.ok())).collect();
    Ok((convoy::admin::cluster_view(&statuses), convoy::admin::newest_map(&statuses)))
}

fn print_plan(plan: &[Action]) {
    if plan.is_empty() {
        println!("plan: nothing to do");
    }
    for a in plan {
        match a {
            Action::Move { shard, from, to } => {
                println!("plan: move {} from node {from} to node {to}", group_name(*shard))
            }
            Action::Prefer { shard, node } => println!("plan: lead shard {shard} from node {node}"),
        }
    }
}

/// Asks for a plan's steps; a move of a shard being moved already is left to that move.
async fn run_plan(client: &Client, plan: &[Action]) -> Result<()> {
    for a in plan {
        let asked = match *a {
            Action::Move { shard, from, to } => client.move_replica(shard, from, to).await,
            Action::Prefer { shard, node } => client.transfer_leader(shard, node).await,
        };
        match asked {
            Ok(_) => {}
            Err(convoy::Error::Rejected(why)) if why.contains("already being moved") => {}
            Err(e) => bail!("{a:?}: {e}"),
        }
    }
    Ok(())
}

/// Waits until no move is in progress, printing each second what is; fails at `deadline`.
async fn wait_moves(args: &StatusArgs, command: &str, started: Instant, deadline: Instant) -> Result<ClusterMap> {
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    loop {
        let (view, map) = view_and_map(args, command).await?;
        if view.operations.is_empty() {
            return Ok(map);
        }
        if Instant::now() >= deadline {
            bail!("moves still in progress at the timeout; they go on (see `convoy admin status`)");
        }
        let now = Instant::now();
        let lines: Vec<String> = view
            .operations
            .iter()
            .map(|o| {
                let last = seen.get(&o.id).copied();
                let (line, next) = progress_line(o, last, now);
                seen.insert(o.id, next);
                line
            })
            .collect();
        if !args.json {
            println!("  {:>6.1} s  {}", started.elapsed().as_secs_f64(), lines.join("; "));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One move's progress as `--wait` last saw it, and the rates since the first sight.
#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    copying: bool,
    bytes: Option<u64>,
    behind: Option<u64>,
    bytes_per_s: Option<f64>,
    entries_per_s: Option<f64>,
}

/// Bytes in the unit that reads best: `812 B`, `25.3 KB`, `4.1 MB`, `1.20 GB`.
fn human_bytes(b: f64) -> String {
    match b {
        b if b < 1e3 => format!("{b:.0} B"),
        b if b < 1e6 => format!("{:.1} KB", b / 1e3),
        b if b < 1e9 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.2} GB", b / 1e9),
    }
}

/// A move's progress line: while its snapshot copies, a bar of the bytes copied against the
/// shard's estimated size, the copy's rate and an estimate of the time left; then the
/// entries the new replica is behind, the rate it closes them at, and the time left.
fn progress_line(o: &convoy::admin::OperationView, last: Option<Seen>, now: Instant) -> (String, Seen) {
    let p = &o.progress;
    let smooth = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.5 * o + 0.5 * new));
    let mut next = Seen {
        at: now,
        copying: p.copying,
        bytes: p.bytes_copied,
        behind: p.entries_behind,
        bytes_per_s: None,
        entries_per_s: None,
    };
    if let Some(l) = last {
        let dt = now.saturating_duration_since(l.at).as_secs_f64().max(0.001);
        next.bytes_per_s = match (l.bytes, p.bytes_copied) {
            (Some(a), Some(b)) if p.copying && b >= a => smooth(l.bytes_per_s, (b - a) as f64 / dt),
            _ => l.bytes_per_s,
        };
        // An installed snapshot drops what is behind at once: only log catch-up is a rate.
        let by_log = !p.copying && !l.copying;
        next.entries_per_s = match (l.behind, p.entries_behind) {
            (Some(a), Some(b)) if by_log && a > b => smooth(l.entries_per_s, (a - b) as f64 / dt),
            (Some(_), Some(_)) if by_log => smooth(l.entries_per_s, 0.0),
            _ => l.entries_per_s,
        };
    }
    let head = format!("{} {}→{} {}", group_name(o.shard), o.from, o.to, o.state);
    let line = match (p.copying, p.bytes_copied) {
        (true, Some(copied)) => {
            let rate = next.bytes_per_s.map_or("?".to_string(), |r| format!("{}/s", human_bytes(r)));
            match p.shard_bytes.filter(|t| *t > copied) {
                Some(total) => {
                    let done = (copied as f64 / total as f64).min(1.0);
                    let filled = (done * 20.0).round() as usize;
                    let eta = next
                        .bytes_per_s
                        .filter(|r| *r > 0.0)
                        .map_or("?".to_string(), |r| format!("{:.0} s", (total - copied) as f64 / r));
                    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled));
                    let (copied, total) = (human_bytes(copied as f64), human_bytes(total as f64));
                    format!("{head} {bar} {copied} of ~{total} copied at {rate}, ETA ≥{eta}")
                }
                None => format!("{head} {} copied at {rate}", human_bytes(copied as f64)),
            }
        }
        _ => match p.entries_behind {
            Some(behind) => {
                let eta = match next.entries_per_s.filter(|r| *r > 0.0) {
                    Some(r) => format!(", closing {r:.0} entries/s, ETA {:.0} s", behind as f64 / r),
                    None => String::new(),
                };
                format!("{head} ({behind} entries behind{eta})")
            }
            None => format!("{head} (? behind)"),
        },
    };
    (line, next)
}

/// How a node is emptied: `admin drain` (it runs and deletes its copies once moved) or
/// `admin replace-node` (its disk is gone).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Emptying {
    Drain,
    /// With `in_place`, rebuilt on the node itself rather than moved away.
    Replace {
        in_place: bool,
    },
}

/// `admin drain` and `admin replace-node`: marks the node draining (or lost), then plans
/// and asks for its moves, in waves with `wait` until it holds nothing.
async fn drain(args: &StatusArgs, node: u64, how: Emptying, wait: bool, timeout: Duration) -> Result<()> {
    let client = args.admin_client()?;
    let (started, deadline) = (Instant::now(), Instant::now() + timeout);
    let what = match how {
        Emptying::Drain => "drain",
        Emptying::Replace { .. } => "replace-node",
    };
    if let Emptying::Replace { in_place } = how {
        // A node that answers still has its data (and would keep running stale replicas):
        // it is drained, not replaced.
        match tokio::time::timeout(Duration::from_secs(5), client.status(node)).await {
            Ok(Ok(_)) => {
                bail!("replace-node: node {node} answers, so its data is not lost: use `convoy admin drain {node}`")
            }
            // Only a node that cannot be reached is taken for lost: one this file does not
            // name (or a credential it refuses) says nothing about whether it runs.
            Ok(Err(e @ (convoy::Error::InvalidInput(_) | convoy::Error::Forbidden(_) | convoy::Error::Config(_)))) => {
                bail!("replace-node: cannot tell whether node {node} is down: {e}")
            }
            Ok(Err(_)) | Err(_) => {}
        }
        let (_, map) = view_and_map(args, "admin replace-node").await?;
        let elsewhere = if in_place { Err("--in-place".to_string()) } else { convoy::admin::plan_drain(&map, node) };
        client.mark_lost(node).await.map_err(|e| anyhow!("replace-node: {e}"))?;
        if let Err(why) = elsewhere {
            return rebuild_in_place(args, node, &why, wait, started, deadline).await;
        }
    } else {
        client.drain(node).await.map_err(|e| anyhow!("drain: {e}"))?;
    }
    let mut planned = Vec::new();
    loop {
        let (_, map) = view_and_map(args, &format!("admin {what}")).await?;
        let plan = convoy::admin::plan_drain(&map, node).map_err(|e| anyhow!("{what}: {e}"))?;
        if !args.json {
            print_plan(&plan);
        }
        run_plan(&client, &plan).await?;
        planned.extend(plan.iter().cloned());
        if !wait {
            break;
        }
        let map = wait_moves(args, &format!("admin {what}"), started, deadline).await?;
        let keeps_metadata = convoy::admin::keeps_metadata(&map, node);
        if !map.holds_replicas(node) || (keeps_metadata && !map.shards.iter().any(|p| p.holds(node))) {
            if !args.json {
                println!("node {node} holds no shard ({:.1} s)", started.elapsed().as_secs_f64());
                if keeps_metadata {
                    println!(
                        "node {node} keeps its replica of the metadata group: every other active node holds one. \
                         Add a node and drain again to move it; until then node {node} cannot be removed."
                    );
                }
            }
            break;
        }
        if Instant::now() >= deadline {
            bail!("node {node} still holds shards at the timeout");
        }
    }
    if args.json {
        println!("{}", json!({"node": node, "plan": planned, "elapsed_s": started.elapsed().as_secs_f64()}));
    }
    Ok(())
}

/// `admin replace-node` on the node itself, once it is marked lost: it rebuilds its replicas
/// under new ids when started with an empty data directory (`raft::formation`), then is
/// active again. With `wait`, follows it until then.
async fn rebuild_in_place(
    args: &StatusArgs,
    node: u64,
    why: &str,
    wait: bool,
    started: Instant,
    deadline: Instant,
) -> Result<()> {
    if !args.json {
        println!(
            "node {node} is marked lost; its shards are rebuilt on it ({why}). Start it with an empty data \
             directory (`convoy node --config {} --id {node}`, or `convoy cluster up`): it joins each shard it \
             held as a new replica and votes once caught up.",
            args.config.display()
        );
    }
    if wait {
        loop {
            let (view, map) = view_and_map(args, "admin replace-node").await?;
            if map.node_state(node) == Some(NodeState::Active) {
                if !args.json {
                    println!(
                        "node {node} rebuilt its replicas and is active ({:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                break;
            }
            if Instant::now() >= deadline {
                bail!("node {node} is still lost at the timeout: has it been started with an empty data directory?");
            }
            if !args.json {
                let state = view.nodes.iter().find(|n| n.id == node).map_or("unknown", |n| n.state);
                println!("  {:>6.1} s  node {node} {state}", started.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    if args.json {
        let elapsed_s = started.elapsed().as_secs_f64();
        println!("{}", json!({"node": node, "in_place": true, "rebuilt": wait, "elapsed_s": elapsed_s}));
    }
    Ok(())
}

/// `admin rebalance`: plans and asks for the moves, in waves with `wait`, then the leaders.
async fn rebalance(args: &StatusArgs, dry_run: bool, wait: bool, timeout: Duration) -> Result<()> {
    let client = args.admin_client()?;
    let (started, deadline) = (Instant::now(), Instant::now() + timeout);
    let mut planned = Vec::new();
    loop {
        let (_, map) = view_and_map(args, "admin rebalance").await?;
        let plan = convoy::admin::plan_rebalance(&map);
        let moves: Vec<Action> = plan.iter().filter(|a| matches!(a, Action::Move { .. })).cloned().collect();
        if !args.json {
            print_plan(&plan);
        }
        if dry_run {
            planned = plan;
            break;
        }
        if moves.is_empty() || !wait {
            // The leaders last: a shard's preferred leader must already vote in it.
            let moved: Vec<u32> = moves
                .iter()
                .filter_map(|a| if let Action::Move { shard, .. } = a { Some(*shard) } else { None })
                .collect();
            let now: Vec<Action> = plan
                .iter()
                .filter(|a| match a {
                    Action::Move { .. } => true,
                    Action::Prefer { shard, .. } => !moved.contains(shard),
                })
                .cloned()
                .collect();
            run_plan(&client, &now).await?;
            planned.extend(now);
            break;
        }
        run_plan(&client, &moves).await?;
        planned.extend(moves);
        wait_moves(args, "admin rebalance", started, deadline).await?;
    }
    if wait && !dry_run {
        // Leadership follows the preferred leaders once each new leader has the whole log.
        loop {
            let (view, _) = view_and_map(args, "admin rebalance").await?;
            if view.shards.iter().all(|s| s.leader.is_some() && s.leader == s.preferred_leader) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("leaders are not yet where the plan put them at the timeout (see `convoy admin status`)");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !args.json {
            println!("balanced ({:.1} s)", started.elapsed().as_secs_f64());
        }
    }
    if args.json {
        println!("{}", json!({"plan": planned, "dry_run": dry_run, "elapsed_s": started.elapsed().as_secs_f64()}));
    }
    Ok(())
}

/// `admin move`: records the move, then with `wait` follows it until it leaves the map's
/// operations, and says whether it was done or cancelled.
async fn move_replica(args: &StatusArgs, shard: u32, from: u64, to: u64, wait: bool, timeout: Duration) -> Result<()> {
    let client = args.admin_client()?;
    let started = Instant::now();
    let (epoch, changed) = loop {
        match client.move_replica(shard, from, to).await {
            Ok(answer) => break answer,
            Err(e @ convoy::Error::Unavailable(_)) if started.elapsed() < timeout => {
                tracing::debug!(error = %e, "asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("move: {e}"),
        }
    };
    if !args.json {
        let what = if changed { "recorded" } else { "already under way" };
        println!("{}: move from node {from} to node {to} {what} (cluster map epoch {epoch})", group_name(shard));
    }
    let mut op_id = None;
    let mut replicas = Vec::new();
    if wait {
        let deadline = started + timeout;
        let mut seen: Option<Seen> = None;
        loop {
            let (_, answers) = node_statuses(args, "admin move").await?;
            let statuses: Vec<_> = answers.into_iter().map(|(id, a)| (id, a.ok())).collect();
            let view = convoy::admin::cluster_view(&statuses);
            let op = view.operations.iter().find(|o| o.shard == shard && o.from == from && o.to == to);
            if let Some(op) = op {
                op_id = Some(op.id);
                let (line, next) = progress_line(op, seen, Instant::now());
                seen = Some(next);
                if !args.json {
                    println!("  {:>5.1} s  operation {}: {line}", started.elapsed().as_secs_f64(), op.id);
                }
            } else if view.epoch > epoch {
                // The map says where the move left the shard (the groups' own membership, in
                // the nodes' views, may lag it by a moment).
                let map = convoy::admin::newest_map(&statuses);
                replicas = map.placement(shard).map(|p| p.voters.clone()).unwrap_or_default();
                if replicas.contains(&to) && !replicas.contains(&from) {
                    break;
                }
                bail!(
                    "the move of {} ended without {to} replacing {from} (cancelled?): voters {replicas:?}",
                    group_name(shard)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the move of {} is not done after {timeout:?}; it goes on (see `convoy admin status`)",
                    group_name(shard)
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !args.json {
            println!("{} moved: voters {replicas:?} ({:.1} s)", group_name(shard), started.elapsed().as_secs_f64());
        }
    }
    if args.json {
        let elapsed_s = started.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"shard": shard, "from": from, "to": to, "epoch": epoch, "op": op_id, "done": wait, "replicas": replicas, "elapsed_s": elapsed_s})
        );
    }
    Ok(())
}

/// `admin transfer-leader`: records the preferred leader, then with `wait` follows the
/// shard's leader until it is `to`.
async fn transfer_leader(args: &StatusArgs, shard: u32, to: u64, wait: bool, timeout: Duration) -> Result<()> {
    let client = args.admin_client()?;
    let started = Instant::now();
    // Unavailable is transient (no leader of the metadata group yet, or none reachable):
    // asked again until the timeout. Any other refusal is final.
    let (epoch, changed) = loop {
        match client.transfer_leader(shard, to).await {
            Ok(answer) => break answer,
            Err(e @ convoy::Error::Unavailable(_)) if started.elapsed() < timeout => {
                tracing::debug!(error = %e, "asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("transfer-leader: {e}"),
        }
    };
    if !args.json {
        let what = if changed { "recorded" } else { "already recorded" };
        println!("shard {shard}: node {to} {what} as preferred leader (cluster map epoch {epoch})");
    }
    let mut leader = None;
    if wait {
        let deadline = started + timeout;
        loop {
            let (_, answers) = node_statuses(args, "admin transfer-leader").await?;
            let statuses: Vec<_> = answers.into_iter().map(|(id, a)| (id, a.ok())).collect();
            let view = convoy::admin::cluster_view(&statuses);
            leader = view.shards.iter().find(|s| s.shard == shard).and_then(|s| s.leader);
            if leader == Some(to) {
                break;
            }
            if Instant::now() >= deadline {
                let now = leader.map_or("no node".to_string(), |l| format!("node {l}"));
                bail!(
                    "shard {shard} is still led by {now} after {timeout:?}: node {to}'s replica has not caught up, \
                     or the leader cannot hand over (see `convoy admin status`)"
                );
            }
            if !args.json {
                let now = leader.map_or("none".to_string(), |l| l.to_string());
                println!(
                    "  {:>4.1} s  shard {shard} led by {now}, waiting for node {to}",
                    started.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !args.json {
            println!("shard {shard} is led by node {to} ({:.1} s)", started.elapsed().as_secs_f64());
        }
    }
    if args.json {
        let elapsed_s = started.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"shard": shard, "to": to, "epoch": epoch, "changed": changed, "leader": leader, "elapsed_s": elapsed_s})
        );
    }
    Ok(())
}

async fn chat(client: &Client, conversation: &str) -> Result<()> {
    // Where to start showing: the last 20 messages (from the start if the head is unknown).
    let (_, head) = client.cursor(conversation).await.unwrap_or((0, 0));
    let from = head.saturating_sub(19).max(1);
    let mut sub = client.subscribe(conversation, from, None);
    println!("# {conversation} as {}; type a line and press enter to send, ctrl-d to leave", client.user());
    let sender = client.clone();
    let conv = conversation.to_string();
    let input = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Handle::current();
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            match runtime.block_on(sender.send(&conv, &line)) {
                Ok(_) => {}
                // It may have been stored: if so it shows below as it arrives.
                Err(e @ convoy::error::Error::Ambiguous(_)) => eprintln!("! sent, not confirmed: {e}"),
                Err(e) => eprintln!("! not sent: {e}"),
            }
        }
    });
    let show = async {
        while let Some(ev) = sub.next().await {
            match ev {
                Event::Message(m) => print_message(&m, false),
                Event::Failed(e) => {
                    eprintln!("! {e}");
                    return;
                }
                Event::Waiting { node, error, retry_in_ms } => {
                    eprintln!("! not attached: node {node}: {error}; trying again in {retry_in_ms} ms")
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = input => {},
        _ = show => {},
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy::admin::{OperationView, Progress};

    fn op(copying: bool, bytes: Option<u64>, behind: Option<u64>) -> OperationView {
        OperationView {
            id: 1,
            kind: "move",
            shard: 0,
            from: 3,
            to: 4,
            state: "catching_up",
            progress: Progress { entries_behind: behind, copying, bytes_copied: bytes, shard_bytes: Some(10_000_000) },
        }
    }

    #[test]
    fn wait_shows_the_copy_with_a_bar_rate_and_eta_then_the_entries_left() {
        let t0 = Instant::now();
        let (first, seen) = progress_line(&op(true, Some(1_000_000), Some(9_000)), None, t0);
        assert!(first.contains("1.0 MB of ~10.0 MB copied at ?"), "{first}");
        // 2.5 MB more in 1 s: 2.5 MB/s, 6.5 MB left, so at least 2.6 s.
        let (line, seen) =
            progress_line(&op(true, Some(3_500_000), Some(9_000)), Some(seen), t0 + Duration::from_secs(1));
        assert!(line.contains("[#######-------------] 3.5 MB of ~10.0 MB copied at 2.5 MB/s, ETA ≥3 s"), "{line}");
        assert_eq!(
            (human_bytes(812.0), human_bytes(25_300.0), human_bytes(1.2e9)),
            ("812 B".into(), "25.3 KB".into(), "1.20 GB".into())
        );
        // Installed: the replica closes the entries it is behind.
        let (line, seen) =
            progress_line(&op(false, Some(10_000_000), Some(900)), Some(seen), t0 + Duration::from_secs(2));
        assert!(line.ends_with("(900 entries behind)"), "{line}");
        let (line, _) = progress_line(&op(false, Some(10_000_000), Some(300)), Some(seen), t0 + Duration::from_secs(4));
        assert!(line.contains("(300 entries behind, closing 300 entries/s, ETA 1 s)"), "{line}");
    }

    #[test]
    fn a_pid_file_names_the_node_only_while_that_process_runs() {
        assert!(is_node_cmdline(b"/x/convoy\0node\0--config\0/c.toml\0--id\x002\0", 2));
        assert!(!is_node_cmdline(b"/x/convoy\0node\0--config\0/c.toml\0--id\x0012\0", 2), "another node");
        assert!(!is_node_cmdline(b"/usr/bin/vim\0--id\x002\0", 2), "not a node");
        assert!(!is_node_cmdline(b"", 2));

        // This test's own process: alive, but not a node, so never taken for one.
        let me = std::process::id();
        let ticks = start_ticks(me).expect("own start time");
        assert_eq!(pid_record(me), format!("{me} {ticks}\n"));
        assert_eq!(ours(&pid_record(me), 1), None, "a live process that is not node 1");

        // A node's process: `sh node --config c.toml --id 7` runs the script `node` from its
        // directory, so its command line has `node` as argv[1] and `--id 7`, as a node's does.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("node"), "sleep 30\n").expect("script");
        let mut child = std::process::Command::new("/bin/sh")
            .current_dir(dir.path())
            .args(["node", "--config", "c.toml", "--id", "7"])
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        let record = pid_record(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while ours(&record, 7).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(ours(&record, 7), Some(pid), "node 7's process, by the record written at its start");
        assert_eq!(ours(&format!("{pid}"), 7), Some(pid), "a record of an older version: the pid alone");
        assert_eq!(ours(&record, 8), None, "not node 8's");
        // The same pid with another start time is a reused pid.
        let (_, ticks) = record.trim().split_once(' ').expect("pid and ticks");
        let other: u64 = ticks.parse::<u64>().expect("ticks") + 1;
        assert_eq!(ours(&format!("{pid} {other}"), 7), None, "the pid reused by another process");
        assert_eq!(ours("not-a-pid 5", 7), None);
        assert_eq!(ours(&format!("{pid} not-ticks"), 7), None);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(ours(&record, 7), None, "an exited process");
    }
}
