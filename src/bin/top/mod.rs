//! `convoy top`: a live terminal view of the cluster — nodes, shards and their leaders, send
//! rate, p99, and follower and subscriber lag — from every node's status (an admin
//! credential), refreshed each second. `q` (or Esc, or Ctrl-C) quits.
//!
//! Rates and the p99 are over the last interval: the difference of two status samples (the
//! nodes' counters and send-latency histograms are cumulative since their start).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use convoy::client::Client;
use convoy::net::wire::NodeStatus;
use ratatui::backend::TestBackend;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};

/// How long a node may take to answer one status request.
const STATUS_TIMEOUT: Duration = Duration::from_millis(900);

/// Every node's status (or why there is none) at one moment.
pub struct Sample {
    at: Instant,
    nodes: BTreeMap<u64, std::result::Result<NodeStatus, String>>,
}

impl Sample {
    /// Asks every node at once.
    pub async fn take(client: &Client, ids: &[u64]) -> Sample {
        let asks = ids.iter().map(|&id| async move {
            let answer = match tokio::time::timeout(STATUS_TIMEOUT, client.status(id)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {STATUS_TIMEOUT:?}")),
            };
            (id, answer)
        });
        let nodes = futures::future::join_all(asks).await.into_iter().collect();
        Sample { at: Instant::now(), nodes }
    }
}

/// One node's line.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub id: u64,
    /// Why the node did not answer.
    pub down: Option<String>,
    pub leads: usize,
    /// Sends acked per second over the interval (`None` on the first sample).
    pub acked_per_s: Option<f64>,
    /// p99 of a proposal to its outcome on this node as leader, over the interval (since the
    /// node's start on the first sample), in ms.
    pub send_p99_ms: Option<f64>,
    pub fsync_p99_ms: Option<f64>,
    /// Committed entries not applied yet, over every shard.
    pub apply_lag: u64,
    pub subscribers: u64,
    pub subscriber_lag_max: u64,
    /// Followers of this node's shards flagged as lagging.
    pub followers_lagging: usize,
}

/// One shard's line, as its leader reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRow {
    pub shard: u32,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    /// (node, entries behind, flagged) for each follower, from the leader.
    pub followers: Vec<(u64, u64, bool)>,
}

/// What the screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub nodes: Vec<NodeRow>,
    pub shards: Vec<ShardRow>,
    pub acked_per_s: Option<f64>,
}

/// The `stage`'s p99 in ms over what `cur` counted after `prev`.
fn p99_ms(cur: &NodeStatus, prev: Option<&NodeStatus>, stage: &str) -> Option<f64> {
    let find = |s: &NodeStatus| s.stages.iter().find(|x| x.stage == stage).cloned();
    let now = find(cur)?;
    let period = match prev.and_then(find) {
        Some(before) => now.since(&before),
        None => now,
    };
    period.quantile_us(0.99).map(|us| us as f64 / 1000.0)
}

/// The view of `cur`, with rates over the time since `prev`.
pub fn view(prev: Option<&Sample>, cur: &Sample) -> View {
    let dt = prev.map(|p| cur.at.saturating_duration_since(p.at).as_secs_f64()).filter(|d| *d > 0.0);
    let mut nodes = Vec::new();
    let mut shards: BTreeMap<u32, ShardRow> = BTreeMap::new();
    for (&id, answer) in &cur.nodes {
        let s = match answer {
            Ok(s) => s,
            Err(why) => {
                nodes.push(NodeRow {
                    id,
                    down: Some(why.clone()),
                    leads: 0,
                    acked_per_s: None,
                    send_p99_ms: None,
                    fsync_p99_ms: None,
                    apply_lag: 0,
                    subscribers: 0,
                    subscriber_lag_max: 0,
                    followers_lagging: 0,
                });
                continue;
            }
        };
        let before = prev.and_then(|p| p.nodes.get(&id)).and_then(|a| a.as_ref().ok());
        let acked_per_s = match (before, dt) {
            (Some(b), Some(dt)) => Some(s.sends_acked.saturating_sub(b.sends_acked) as f64 / dt),
            _ => None,
        };
        let led: Vec<_> = s.shards.iter().filter(|x| x.leader == Some(id)).collect();
        for x in &led {
            shards.insert(
                x.shard,
                ShardRow {
                    shard: x.shard,
                    leader: Some(id),
                    term: x.term,
                    last_log_index: x.last_log_index.unwrap_or(0),
                    followers: x.followers.iter().map(|f| (f.node, f.entries, f.lagging)).collect(),
                },
            );
        }
        for x in &s.shards {
            shards.entry(x.shard).or_insert_with(|| ShardRow {
                shard: x.shard,
                leader: x.leader,
                term: x.term,
                last_log_index: x.last_log_index.unwrap_or(0),
                followers: Vec::new(),
            });
        }
        nodes.push(NodeRow {
            id,
            down: None,
            leads: led.len(),
            acked_per_s,
            send_p99_ms: p99_ms(s, before, "send"),
            fsync_p99_ms: p99_ms(s, before, "fsync"),
            apply_lag: s
                .shards
                .iter()
                .map(|x| x.last_log_index.unwrap_or(0).saturating_sub(x.last_applied_index.unwrap_or(0)))
                .sum(),
            subscribers: s.subscribers,
            subscriber_lag_max: s.subscriber_lag_max,
            followers_lagging: led.iter().map(|x| x.followers.iter().filter(|f| f.lagging).count()).sum(),
        });
    }
    let rates: Vec<f64> = nodes.iter().filter_map(|n| n.acked_per_s).collect();
    let acked_per_s = (!rates.is_empty()).then(|| rates.iter().sum());
    View { nodes, shards: shards.into_values().collect(), acked_per_s }
}

fn rate(r: Option<f64>) -> String {
    match r {
        None => "…".into(),
        Some(r) if r >= 10_000.0 => format!("{:.1}k/s", r / 1000.0),
        Some(r) => format!("{r:.0}/s"),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 1.0 => format!("{v:.2} ms"),
        Some(v) => format!("{v:.1} ms"),
    }
}

/// Draws `view` on `frame`.
pub fn render(frame: &mut Frame, view: &View, title: &str) {
    let up = view.nodes.iter().filter(|n| n.down.is_none()).count();
    let header = Line::from(format!(
        "convoy top — {title} — {up}/{} nodes up — {} acked — q quits",
        view.nodes.len(),
        rate(view.acked_per_s)
    ))
    .style(Style::default().add_modifier(Modifier::BOLD));
    let [top, middle, bottom] =
        Layout::vertical([Constraint::Length(1), Constraint::Length(view.nodes.len() as u16 + 3), Constraint::Min(3)])
            .areas(frame.area());
    frame.render_widget(Paragraph::new(header), top);

    let bold = Style::default().add_modifier(Modifier::BOLD);
    let node_rows = view.nodes.iter().map(|n| match &n.down {
        Some(why) => Row::new(vec![
            format!("node {}", n.id),
            "DOWN".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            why.clone(),
        ]),
        None => Row::new(vec![
            format!("node {}", n.id),
            "up".into(),
            n.leads.to_string(),
            rate(n.acked_per_s),
            ms(n.send_p99_ms),
            ms(n.fsync_p99_ms),
            n.apply_lag.to_string(),
            n.subscribers.to_string(),
            n.subscriber_lag_max.to_string(),
            if n.followers_lagging > 0 { format!("{} LAGGING", n.followers_lagging) } else { "0".into() },
        ]),
    });
    let widths = [
        Constraint::Length(7),
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(11),
        Constraint::Length(9),
        Constraint::Min(10),
    ];
    let node_table = Table::new(node_rows, widths)
        .header(
            Row::new(vec![
                "",
                "",
                "leads",
                "acked",
                "send p99",
                "fsync p99",
                "apply lag",
                "subscribers",
                "sub lag",
                "followers",
            ])
            .style(bold),
        )
        .block(Block::default().borders(Borders::ALL).title("nodes"));
    frame.render_widget(node_table, middle);

    let shard_rows = view.shards.iter().map(|s| {
        let followers: Vec<String> = s
            .followers
            .iter()
            .map(|(node, behind, lagging)| {
                format!("node {node}: {behind} behind{}", if *lagging { " LAGGING" } else { "" })
            })
            .collect();
        Row::new(vec![
            s.shard.to_string(),
            s.leader.map_or_else(|| "NONE".into(), |l| format!("node {l}")),
            s.term.to_string(),
            s.last_log_index.to_string(),
            followers.join(", "),
        ])
    });
    let shard_table = Table::new(
        shard_rows,
        [
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(10),
            Constraint::Min(20),
        ],
    )
    .header(Row::new(vec!["shard", "leader", "term", "log index", "followers (entries behind the leader)"]).style(bold))
    .block(Block::default().borders(Borders::ALL).title("shards"));
    frame.render_widget(shard_table, bottom);
}

/// The rows `view` needs on a screen of its own.
fn height(view: &View) -> u16 {
    (1 + view.nodes.len() + 3 + view.shards.len() + 3) as u16
}

/// `view` drawn as plain text, one line per screen row (for `--once`, and tests).
pub fn text(view: &View, title: &str, width: u16) -> Result<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height(view)))?;
    terminal.draw(|f| render(f, view, title))?;
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..buffer.area.height {
        let line: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// Runs the live view until `q`; with `once`, prints one view (two samples `interval` apart)
/// and returns.
pub async fn run(client: &Client, ids: &[u64], title: &str, interval: Duration, once: bool) -> Result<()> {
    if once {
        let first = Sample::take(client, ids).await;
        tokio::time::sleep(interval).await;
        let second = Sample::take(client, ids).await;
        print!("{}", text(&view(Some(&first), &second), title, 130)?);
        return Ok(());
    }
    // Keys are read on a thread of their own; a quit key closes the channel's sender.
    let (quit_tx, mut quit) = tokio::sync::oneshot::channel::<()>();
    let keys = std::thread::spawn(move || -> std::io::Result<()> {
        use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
        loop {
            if quit_tx.is_closed() {
                return Ok(());
            }
            if !event::poll(Duration::from_millis(100))? {
                continue;
            }
            if let Event::Key(k) = event::read()? {
                let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c) {
                    let _ = quit_tx.send(());
                    return Ok(());
                }
            }
        }
    });
    let mut terminal = ratatui::init();
    let mut prev: Option<Sample> = None;
    let outcome = loop {
        let cur = Sample::take(client, ids).await;
        let v = view(prev.as_ref(), &cur);
        if let Err(e) = terminal.draw(|f| render(f, &v, title)) {
            break Err(e.into());
        }
        prev = Some(cur);
        tokio::select! {
            _ = &mut quit => break Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    };
    ratatui::restore();
    drop(quit);
    let _ = keys.join();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy::net::wire::{FollowerLag, ShardStatus, StageSnapshot};

    fn status(node: u64, acked: u64, send_buckets: Vec<(u32, u64)>, lagging: bool) -> NodeStatus {
        let shard = |shard: u32, leader: u64| ShardStatus {
            shard,
            leader: Some(leader),
            replica: node,
            term: 3,
            role: "Leader".into(),
            last_log_index: Some(120),
            last_applied_index: Some(118),
            voters: vec![1, 2, 3],
            learners: Vec::new(),
            followers: if leader == node {
                vec![FollowerLag { node: 2, entries: if lagging { 5000 } else { 0 }, lagging }]
            } else {
                Vec::new()
            },
            ..ShardStatus::default()
        };
        NodeStatus {
            node_id: node,
            shards: vec![shard(0, 1), shard(1, 2)],
            fsyncs: 0,
            fsync_completions: 0,
            fsync_us_total: 0,
            sends_committed: 0,
            entries_committed: 0,
            append_rpcs: 0,
            append_rpc_entries: 0,
            append_rpcs_empty: 0,
            append_rpcs_cut: 0,
            append_frames: 0,
            sends_throttled: 0,
            sends_queued: 0,
            subscribers: 4,
            subscriber_lag_max: 12_000,
            sends_acked: acked,
            stages: vec![StageSnapshot { stage: "send".into(), buckets: send_buckets }],
            meta: None,
            placement: Default::default(),
        }
    }

    #[test]
    fn rates_and_p99_are_over_the_interval_and_every_figure_is_shown() {
        let t0 = Instant::now();
        let prev = Sample {
            at: t0,
            nodes: BTreeMap::from([(1, Ok(status(1, 1000, vec![(8, 100)], false))), (2, Err("refused".into()))]),
        };
        // In 2 s node 1 acked 3,000 more, 98 of 100 new sends in bucket 8 (8 µs), 2 in 80.
        let cur = Sample {
            at: t0 + Duration::from_secs(2),
            nodes: BTreeMap::from([
                (1, Ok(status(1, 4000, vec![(8, 198), (80, 2)], true))),
                (2, Err("no answer within 900ms".into())),
            ]),
        };
        let v = view(Some(&prev), &cur);
        let n1 = &v.nodes[0];
        assert_eq!(n1.acked_per_s, Some(1500.0));
        assert_eq!(n1.leads, 1);
        assert_eq!(n1.apply_lag, 4);
        assert_eq!(n1.followers_lagging, 1);
        // Since the start, 2 of 200 are slow: the p99 is bucket 8. Over the interval 2 of 100
        // are: bucket 80, 4,607 µs.
        let since_start = StageSnapshot { stage: "send".into(), buckets: vec![(8, 198), (80, 2)] };
        assert_eq!(since_start.quantile_us(0.99), Some(8));
        assert_eq!(n1.send_p99_ms, Some(4.607));
        assert_eq!(v.nodes[1].down.as_deref(), Some("no answer within 900ms"));
        assert_eq!(v.shards.len(), 2);
        assert_eq!(v.shards[0].followers, vec![(2, 5000, true)]);
        assert_eq!(v.acked_per_s, Some(1500.0));

        let screen = text(&v, "cluster.toml", 130).expect("render");
        for shown in [
            "1/2 nodes up",
            "1500/s acked",
            "node 1",
            "4.6 ms",
            "DOWN",
            "no answer within",
            "12000",
            "1 LAGGING",
            "5000 behind LAGGING",
        ] {
            assert!(screen.contains(shown), "{shown:?} missing from:\n{screen}");
        }
        // Without an earlier sample there is no rate yet.
        assert_eq!(view(None, &cur).nodes[0].acked_per_s, None);
    }
}
