//! Plots and a short human summary of a recorded [history](crate::history).
//!
//! Everything here is pure: a history goes in, standalone SVG documents (strings) and text come
//! out. Three plots share one time axis (seconds since the start of the run), so they line up
//! when stacked:
//!
//! - **latency**: every client operation (`send`, `resend`, `read`, `final-read`,
//!   `final-send`) as a point at (invoke time, latency) on a log scale; green `ok`, red `fail`,
//!   orange `info`, hollow orange when the operation never completed (plotted at the run's end);
//!   the marker shape tells the `f`.
//! - **throughput**: `ok` completions per one-second bucket, one line per `f` (including
//!   `deliver`), and a dashed line of `fail` + `info` completions.
//! - **acked but unseen**: every 200 ms, how many `ok` sends have no `deliver` of their text yet:
//!   delivery lag and outages, and at the end, messages never delivered.
//!
//! Fault periods ([`fault_periods`]) are shaded behind the data of every plot and labelled
//! with the nemesis `f` and its nodes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde_json::Value;

use crate::history::{Op, Process, Type, F};

/// The three plots, each a standalone SVG document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plots {
    pub latency_svg: String,
    pub throughput_svg: String,
    pub unseen_svg: String,
}

/// One injected fault, from the nemesis invoke that began it to the completion of the
/// operation that ended it (see [`F::fault_end`]); `end_ns` is `None` when nothing ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPeriod {
    pub f: F,
    pub start_ns: u64,
    pub end_ns: Option<u64>,
    pub nodes: Vec<u64>,
}

/// At most this many points are drawn in the latency plot (beyond it, `ok` points are thinned).
pub const MAX_POINTS: usize = 20_000;
/// Sampling step of the "acked but unseen" curve (coarsened for very long runs).
pub const UNSEEN_STEP_NS: u64 = 200_000_000;
const MAX_UNSEEN_SAMPLES: u64 = 5_000;

const NS_PER_S: f64 = 1e9;
const NS_PER_MS: f64 = 1e6;

// Layout (pixels).
const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 812.0;
const TOP: f64 = 58.0;
const BOTTOM: f64 = 348.0;
const LEGEND_X: f64 = 830.0;

// Colors.
const OK: &str = "#2ca02c";
const FAIL: &str = "#d62728";
const INFO: &str = "#ff7f0e";
const INK: &str = "#222222";
const MUTED: &str = "#666666";
const GRID: &str = "#e6e6e6";

/// Renders the three plots.
pub fn plots(history: &[Op]) -> Plots {
    let end_ns = run_end(history);
    let periods = fault_windows(history);
    let ops = client_ops(history);
    let axis = TimeAxis::new(end_ns);
    Plots {
        latency_svg: latency_svg(&ops, &periods, &axis),
        throughput_svg: throughput_svg(history, &periods, &axis),
        unseen_svg: unseen_svg(history, &ops, &periods, &axis),
    }
}

/// Fault periods, in order of their start.
///
/// A nemesis invoke whose `f` has an [`F::fault_end`] opens a period over the nodes in its
/// `value.nodes`. A later nemesis invoke of the ending `f` (`start`, `resume`, `heal`,
/// `clock-reset`) restores the nodes it names: a period ends when all its nodes are restored;
/// when the ending op names none of an open period's nodes (or no nodes at all), it ends every
/// open period it can end. The runner's final `heal` (`value.final == true`) heals everything
/// and so ends every open period. The end time is the ending op's completion (its invoke time
/// if it has none).
pub fn fault_periods(history: &[Op]) -> Vec<FaultPeriod> {
    fault_windows(history).into_iter().map(|w| w.period).collect()
}

/// A fault period and the nemesis' `value.variant`, if any (for labels).
struct Window {
    period: FaultPeriod,
    variant: Option<String>,
}

fn fault_windows(history: &[Op]) -> Vec<Window> {
    struct Open {
        window: usize,
        remaining: BTreeSet<u64>,
    }
    let nemesis: Vec<&Op> = history.iter().filter(|op| op.process == Process::NEMESIS).collect();
    let mut windows: Vec<Window> = Vec::new();
    let mut open: Vec<Open> = Vec::new();
    for (j, op) in nemesis.iter().enumerate() {
        if op.kind != Type::Invoke {
            continue;
        }
        let nodes = op_nodes(op);
        if op.f.fault_end().is_some() {
            open.push(Open { window: windows.len(), remaining: nodes.iter().copied().collect() });
            let variant = op.value.get("variant").and_then(Value::as_str).map(str::to_string);
            windows.push(Window {
                period: FaultPeriod { f: op.f.clone(), start_ns: op.time, end_ns: None, nodes },
                variant,
            });
            continue;
        }
        // The completion: the next non-invoke of the same f, before any other invoke of it.
        let end_ns = nemesis
            .get(j + 1..)
            .unwrap_or_default()
            .iter()
            .take_while(|n| !(n.kind == Type::Invoke && n.f == op.f))
            .find(|n| n.kind != Type::Invoke && n.f == op.f)
            .map_or(op.time, |n| n.time.max(op.time));
        let heals_all = op.f == F::Heal && op.value.get("final").and_then(Value::as_bool) == Some(true);
        let ends =
            |o: &Open| heals_all || windows.get(o.window).and_then(|w| w.period.f.fault_end()).as_ref() == Some(&op.f);
        let restored: BTreeSet<u64> = nodes.into_iter().collect();
        let targeted = !heals_all && open.iter().any(|o| ends(o) && !o.remaining.is_disjoint(&restored));
        let mut closed: Vec<usize> = Vec::new();
        for o in open.iter_mut() {
            if !ends(o) {
                continue;
            }
            if targeted {
                o.remaining.retain(|n| !restored.contains(n));
                if o.remaining.is_empty() {
                    closed.push(o.window);
                }
            } else {
                closed.push(o.window);
            }
        }
        for &i in &closed {
            if let Some(w) = windows.get_mut(i) {
                w.period.end_ns = Some(end_ns.max(w.period.start_ns));
            }
        }
        open.retain(|o| !closed.contains(&o.window));
    }
    windows
}

/// A few lines for a person: duration, operation counts, faults, the checker's verdict and
/// anomaly counts, and send latencies.
pub fn summary_text(history: &[Op], checker_json: &Value) -> String {
    let mut s = String::new();
    let end_ns = run_end(history);
    let _ = writeln!(s, "run: {:.1} s, {} history ops", end_ns as f64 / NS_PER_S, history.len());

    // Counts by f and type, in the order of F's declaration.
    let mut counts: BTreeMap<F, [usize; 4]> = BTreeMap::new();
    for op in history.iter().filter(|op| op.process != Process::NEMESIS) {
        let slot = match op.kind {
            Type::Invoke => 0,
            Type::Ok => 1,
            Type::Fail => 2,
            Type::Info => 3,
        };
        if let Some(c) = counts.entry(op.f.clone()).or_default().get_mut(slot) {
            *c += 1;
        }
    }
    if counts.is_empty() {
        let _ = writeln!(s, "client ops: none");
    } else {
        let _ = writeln!(s, "client ops:");
        for (f, c) in &counts {
            let parts: Vec<String> = ["invoke", "ok", "fail", "info"]
                .iter()
                .zip(c.iter())
                .filter(|(_, n)| **n > 0)
                .map(|(name, n)| format!("{n} {name}"))
                .collect();
            let _ = writeln!(s, "  {}: {}", f_name(f), parts.join(", "));
        }
    }

    let periods = fault_periods(history);
    if periods.is_empty() {
        let _ = writeln!(s, "faults: none");
    } else {
        let mut by_f: BTreeMap<F, usize> = BTreeMap::new();
        for p in &periods {
            *by_f.entry(p.f.clone()).or_default() += 1;
        }
        let list: Vec<String> = by_f.iter().map(|(f, n)| format!("{} x{n}", f_name(f))).collect();
        let unhealed = periods.iter().filter(|p| p.end_ns.is_none()).count();
        let tail = if unhealed > 0 { format!(" ({unhealed} never ended)") } else { String::new() };
        let _ = writeln!(s, "faults: {}{tail}", list.join(", "));
    }

    let valid = match checker_json.get("valid") {
        Some(Value::String(v)) => v.clone(),
        Some(Value::Bool(true)) => "valid".to_string(),
        Some(Value::Bool(false)) => "invalid".to_string(),
        _ => "unknown".to_string(),
    };
    let anomalies = match checker_json.get("anomaly_counts").and_then(Value::as_object) {
        None => "anomaly counts not reported".to_string(),
        Some(map) => {
            let mut list: Vec<(String, f64)> =
                map.iter().filter_map(|(k, v)| v.as_f64().map(|n| (k.clone(), n))).filter(|(_, n)| *n != 0.0).collect();
            list.sort_by(|a, b| a.0.cmp(&b.0));
            if list.is_empty() {
                "no anomalies".to_string()
            } else {
                let parts: Vec<String> = list.iter().map(|(k, n)| format!("{k} {n}")).collect();
                format!("anomalies: {}", parts.join(", "))
            }
        }
    };
    let _ = writeln!(s, "checker: {valid}; {anomalies}");

    let mut lat: Vec<u64> = client_ops(history)
        .iter()
        .filter(|o| o.f == F::Send)
        .filter_map(|o| match o.completion {
            Some((Type::Ok, t)) => Some(t.saturating_sub(o.invoke_ns)),
            _ => None,
        })
        .collect();
    lat.sort_unstable();
    match (percentile(&lat, 0.5), percentile(&lat, 0.99), lat.last()) {
        (Some(p50), Some(p99), Some(&max)) => {
            let _ = writeln!(
                s,
                "send latency (ok, n={}): p50 {}, p99 {}, max {}",
                lat.len(),
                fmt_ms(p50 as f64 / NS_PER_MS),
                fmt_ms(p99 as f64 / NS_PER_MS),
                fmt_ms(max as f64 / NS_PER_MS)
            );
        }
        _ => {
            let _ = writeln!(s, "send latency: no ok sends");
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// History digestion.

/// A client operation: an invoke and (maybe) its completion.
#[derive(Debug, Clone)]
struct ClientOp<'a> {
    f: F,
    invoke_ns: u64,
    /// The completion's type and time; `None` if the operation never completed.
    completion: Option<(Type, u64)>,
    invoke_value: &'a Value,
    completion_value: Option<&'a Value>,
}

/// Client operations with an invoke (everything but `deliver` and `subscribe`).
fn is_timed(f: &F) -> bool {
    matches!(f, F::Send | F::Resend | F::Read | F::FinalRead | F::FinalSend)
}

/// Pairs each completion with the latest invoke of the same process, in invoke order.
fn client_ops(history: &[Op]) -> Vec<ClientOp<'_>> {
    let mut out: Vec<ClientOp<'_>> = Vec::new();
    let mut pending: HashMap<u64, usize> = HashMap::new();
    for op in history {
        let Process::Client(p) = op.process else { continue };
        if !is_timed(&op.f) {
            continue;
        }
        if op.kind == Type::Invoke {
            pending.insert(p, out.len());
            out.push(ClientOp {
                f: op.f.clone(),
                invoke_ns: op.time,
                completion: None,
                invoke_value: &op.value,
                completion_value: None,
            });
        } else if let Some(c) = pending.remove(&p).and_then(|i| out.get_mut(i)) {
            c.completion = Some((op.kind, op.time.max(c.invoke_ns)));
            c.completion_value = Some(&op.value);
        }
    }
    out
}

fn run_end(history: &[Op]) -> u64 {
    history.iter().map(|op| op.time).max().unwrap_or(0)
}

/// Nodes named by a nemesis op: `value.nodes` (or `value.node`, or the op's `node`).
fn op_nodes(op: &Op) -> Vec<u64> {
    let mut nodes: Vec<u64> = match op.value.get("nodes") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
        _ => op.value.get("node").and_then(Value::as_u64).into_iter().collect(),
    };
    if nodes.is_empty() {
        nodes.extend(op.node);
    }
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

fn f_name(f: &F) -> &'static str {
    match f {
        F::Send => "send",
        F::Resend => "resend",
        F::Read => "read",
        F::Deliver => "deliver",
        F::Subscribe => "subscribe",
        F::FinalRead => "final-read",
        F::FinalSend => "final-send",
        F::Kill => "kill",
        F::Start => "start",
        F::Pause => "pause",
        F::Resume => "resume",
        F::Partition => "partition",
        F::Heal => "heal",
        F::ClockSkew => "clock-skew",
        F::ClockReset => "clock-reset",
        F::PowerFail => "power-fail",
        F::Corrupt => "corrupt",
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

// ---------------------------------------------------------------------------------------------
// The "acked but unseen" series.

/// `(t, n)` every [`UNSEEN_STEP_NS`] from 0 to the end of the run (and at the end): `n` is the
/// number of sends acked `ok` by `t` whose text no subscriber had been delivered by `t`.
fn unseen_series(history: &[Op], ops: &[ClientOp<'_>], end_ns: u64) -> Vec<(u64, u64)> {
    let mut delivered: HashMap<&str, u64> = HashMap::new();
    for op in history.iter().filter(|op| op.f == F::Deliver && op.kind == Type::Ok) {
        if let Some(text) = op.value.get("text").and_then(Value::as_str) {
            let t = delivered.entry(text).or_insert(op.time);
            *t = (*t).min(op.time);
        }
    }
    let mut acked: Vec<u64> = Vec::new();
    let mut seen: Vec<u64> = Vec::new();
    for o in ops.iter().filter(|o| matches!(o.f, F::Send | F::FinalSend)) {
        let Some((Type::Ok, ack)) = o.completion else { continue };
        acked.push(ack);
        let text = o
            .completion_value
            .and_then(|v| v.get("text"))
            .or_else(|| o.invoke_value.get("text"))
            .and_then(Value::as_str);
        if let Some(d) = text.and_then(|t| delivered.get(t)) {
            seen.push((*d).max(ack));
        }
    }
    if acked.is_empty() {
        return Vec::new();
    }
    acked.sort_unstable();
    seen.sort_unstable();
    let step = UNSEEN_STEP_NS.max(end_ns.div_ceil(MAX_UNSEEN_SAMPLES));
    let mut times: Vec<u64> = (0..).map(|i| i * step).take_while(|t| *t < end_ns).collect();
    times.push(end_ns);
    let (mut a, mut d) = (0usize, 0usize);
    times
        .into_iter()
        .map(|t| {
            while acked.get(a).is_some_and(|x| *x <= t) {
                a += 1;
            }
            while seen.get(d).is_some_and(|x| *x <= t) {
                d += 1;
            }
            (t, a.saturating_sub(d) as u64)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SVG building blocks.

/// Escapes text for XML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The shared x axis: seconds from 0 to the end of the run.
struct TimeAxis {
    end_ns: u64,
    span_s: f64,
}

impl TimeAxis {
    fn new(end_ns: u64) -> TimeAxis {
        let span_s = if end_ns == 0 { 1.0 } else { end_ns as f64 / NS_PER_S };
        TimeAxis { end_ns, span_s }
    }

    fn x(&self, t_ns: u64) -> f64 {
        self.x_s(t_ns as f64 / NS_PER_S)
    }

    fn x_s(&self, t_s: f64) -> f64 {
        LEFT + (t_s / self.span_s).clamp(0.0, 1.0) * (RIGHT - LEFT)
    }

    fn draw(&self, s: &mut String) {
        let step = nice_step(self.span_s, 10.0);
        let mut i = 0u32;
        loop {
            let v = f64::from(i) * step;
            if v > self.span_s * 1.000_001 {
                break;
            }
            let x = self.x_s(v);
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="{GRID}"/><text x="{x:.1}" y="{}" font-size="11" fill="{MUTED}" text-anchor="middle">{}</text>"#,
                BOTTOM + 15.0,
                fmt_tick(v, step)
            );
            i += 1;
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="12" fill="{INK}" text-anchor="middle">time since start (s)</text>"#,
            (LEFT + RIGHT) / 2.0,
            BOTTOM + 34.0
        );
    }
}

/// A step of 1, 2 or 5 times a power of ten giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let m = match raw / mag {
        n if n <= 1.0 => 1.0,
        n if n <= 2.0 => 2.0,
        n if n <= 5.0 => 5.0,
        _ => 10.0,
    };
    m * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()).max(0.0) as usize };
    format!("{v:.decimals$}")
}

/// A linear y axis from 0 to a nice maximum at least `max`; returns that maximum.
fn draw_linear_y(s: &mut String, max: f64, label: &str) -> f64 {
    let step = nice_step(max.max(1.0), 5.0).max(1.0);
    let top = (max.max(1.0) / step).ceil() * step;
    let mut i = 0u32;
    loop {
        let v = f64::from(i) * step;
        if v > top * 1.000_001 {
            break;
        }
        let y = BOTTOM - v / top * (BOTTOM - TOP);
        let _ = write!(
            s,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="{GRID}"/><text x="{}" y="{:.1}" font-size="11" fill="{MUTED}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v, step)
        );
        i += 1;
    }
    y_label(s, label);
    top
}

fn y_label(s: &mut String, label: &str) {
    let (x, y) = (18.0, (TOP + BOTTOM) / 2.0);
    let _ = write!(
        s,
        r#"<text x="{x}" y="{y}" font-size="12" fill="{INK}" text-anchor="middle" transform="rotate(-90 {x} {y})">{}</text>"#,
        esc(label)
    );
}

/// Opens a document: background, title, subtitle, and a clip path for the plot area.
fn begin(title: &str, subtitle: &str, id: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">
<title>{t}</title>
<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>
<text x="{LEFT}" y="24" font-size="16" font-weight="bold" fill="{INK}">{t}</text>
<text x="{LEFT}" y="43" font-size="12" fill="{MUTED}">{sub}</text>
<defs><clipPath id="{id}-plot"><rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}"/></clipPath></defs>
"#,
        t = esc(title),
        sub = esc(subtitle),
        w = RIGHT - LEFT,
        h = BOTTOM - TOP
    );
    s
}

/// Closes a document: the plot frame, then `</svg>`.
fn finish(mut s: String) -> String {
    let _ = write!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999999\"/>\n</svg>\n",
        RIGHT - LEFT,
        BOTTOM - TOP
    );
    s
}

/// A plot with nothing to show.
fn no_data(title: &str, why: &str, id: &str, periods: &[Window], axis: &TimeAxis) -> String {
    let mut s = begin(title, why, id);
    axis.draw(&mut s);
    draw_bands(&mut s, periods, axis, id);
    let _ = write!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="20" fill="#999999" text-anchor="middle">no data</text>"##,
        (LEFT + RIGHT) / 2.0,
        (TOP + BOTTOM) / 2.0
    );
    legend(&mut s, &fault_keys(periods));
    finish(s)
}

fn fault_color(f: &F) -> &'static str {
    match f {
        F::Kill => "#7f7f7f",
        F::PowerFail => "#8c564b",
        F::Corrupt => "#e377c2",
        F::Pause => "#bcbd22",
        F::Partition => "#1f77b4",
        F::ClockSkew => "#17becf",
        _ => "#aaaaaa",
    }
}

/// "kill n1", "partition n1,n3 (bridge)".
fn fault_label(w: &Window) -> String {
    let mut label = f_name(&w.period.f).to_string();
    if !w.period.nodes.is_empty() {
        let nodes: Vec<String> = w.period.nodes.iter().map(|n| format!("n{n}")).collect();
        label.push(' ');
        label.push_str(&nodes.join(","));
    }
    if let Some(v) = &w.variant {
        let _ = write!(label, " ({v})");
    }
    label
}

/// Translucent bands (class `fault-band`) over the plot's height, labelled at the top.
fn draw_bands(s: &mut String, periods: &[Window], axis: &TimeAxis, id: &str) {
    if periods.is_empty() {
        return;
    }
    let _ = write!(s, r#"<g clip-path="url(#{id}-plot)">"#);
    for w in periods {
        let p = &w.period;
        let end = p.end_ns.unwrap_or(axis.end_ns).max(p.start_ns);
        let (x0, x1) = (axis.x(p.start_ns), axis.x(end));
        let until = match p.end_ns {
            Some(e) => format!("{:.2} s", e as f64 / NS_PER_S),
            None => "end of run (never ended)".to_string(),
        };
        let _ = write!(
            s,
            r#"<rect class="fault-band" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{}" fill="{}" fill-opacity="0.16"><title>{}: {:.2} s to {until}</title></rect>"#,
            (x1 - x0).max(1.5),
            BOTTOM - TOP,
            fault_color(&p.f),
            esc(&fault_label(w)),
            p.start_ns as f64 / NS_PER_S
        );
    }
    // Labels on the rows at the top of the plot, each on the first row where it does not
    // overlap the previous label.
    let mut row_end = [f64::NEG_INFINITY; 4];
    for w in periods {
        let label = fault_label(w);
        let x = axis.x(w.period.start_ns) + 3.0;
        let width = label.chars().count() as f64 * 6.0;
        let row = row_end
            .iter()
            .position(|e| *e < x)
            .unwrap_or_else(|| row_end.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i));
        if let Some(e) = row_end.get_mut(row) {
            *e = x + width;
        }
        let _ = write!(
            s,
            r##"<text class="fault-label" x="{x:.1}" y="{:.1}" font-size="10" fill="#333333" stroke="white" stroke-width="3" stroke-opacity="0.8" paint-order="stroke">{}</text>"##,
            TOP + 12.0 + 12.0 * row as f64,
            esc(&label)
        );
    }
    s.push_str("</g>\n");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    TriangleDown,
}

fn shape_of(f: &F) -> Shape {
    match f {
        F::Resend => Shape::Square,
        F::Read => Shape::Triangle,
        F::FinalRead => Shape::Diamond,
        F::FinalSend => Shape::TriangleDown,
        _ => Shape::Circle,
    }
}

/// One marker; fill and stroke come from the enclosing group.
fn marker(s: &mut String, shape: Shape, x: f64, y: f64, r: f64) {
    let _ = match shape {
        Shape::Circle => write!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}"/>"#),
        Shape::Square => {
            let h = r * 0.9;
            write!(s, r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#, x - h, y - h, 2.0 * h, 2.0 * h)
        }
        Shape::Triangle => write!(
            s,
            r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}"/>"#,
            y - 1.3 * r,
            x + 1.2 * r,
            y + 0.9 * r,
            x - 1.2 * r,
            y + 0.9 * r
        ),
        Shape::TriangleDown => write!(
            s,
            r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}"/>"#,
            y + 1.3 * r,
            x + 1.2 * r,
            y - 0.9 * r,
            x - 1.2 * r,
            y - 0.9 * r
        ),
        Shape::Diamond => write!(
            s,
            r#"<polygon points="{x:.1},{:.1} {:.1},{y:.1} {x:.1},{:.1} {:.1},{y:.1}"/>"#,
            y - 1.3 * r,
            x + 1.3 * r,
            y + 1.3 * r,
            x - 1.3 * r
        ),
    };
}

/// A legend entry's symbol.
enum Key {
    Marker { shape: Shape, color: &'static str, hollow: bool },
    Line { color: &'static str, dashed: bool, wide: bool },
    Swatch { color: &'static str, opacity: f64 },
}

fn fault_keys(periods: &[Window]) -> Vec<(Key, String)> {
    let kinds: BTreeSet<F> = periods.iter().map(|w| w.period.f.clone()).collect();
    kinds
        .iter()
        .map(|f| (Key::Swatch { color: fault_color(f), opacity: 0.3 }, format!("fault: {}", f_name(f))))
        .collect()
}

fn legend(s: &mut String, items: &[(Key, String)]) {
    if items.is_empty() {
        return;
    }
    s.push_str(r#"<g class="legend">"#);
    for (i, (key, label)) in items.iter().enumerate() {
        let y = TOP + 8.0 + 18.0 * i as f64;
        let x = LEGEND_X + 8.0;
        match key {
            Key::Marker { shape, color, hollow } => {
                let paint = if *hollow {
                    format!(r#"fill="none" stroke="{color}" stroke-width="1.2""#)
                } else {
                    format!(r#"fill="{color}""#)
                };
                let _ = write!(s, "<g {paint}>");
                marker(s, *shape, x, y, 4.0);
                s.push_str("</g>");
            }
            Key::Line { color, dashed, wide } => {
                let dash = if *dashed { r#" stroke-dasharray="5 3""# } else { "" };
                let style = if *wide { r#"stroke-width="4" stroke-opacity="0.45""# } else { r#"stroke-width="2""# };
                let _ = write!(
                    s,
                    r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" {style}{dash}/>"#,
                    x - 8.0,
                    x + 8.0
                );
            }
            Key::Swatch { color, opacity } => {
                let _ = write!(
                    s,
                    r#"<rect x="{}" y="{}" width="16" height="11" fill="{color}" fill-opacity="{opacity}"/>"#,
                    x - 8.0,
                    y - 5.5
                );
            }
        }
        let _ =
            write!(s, r#"<text x="{}" y="{}" font-size="12" fill="{INK}">{}</text>"#, x + 14.0, y + 4.0, esc(label));
    }
    s.push_str("</g>\n");
}

// ---------------------------------------------------------------------------------------------
// The plots.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fail,
    Info,
    Unknown,
}

struct Point {
    t_ns: u64,
    lat_ms: f64,
    shape: Shape,
}

fn latency_svg(ops: &[ClientOp<'_>], periods: &[Window], axis: &TimeAxis) -> String {
    const TITLE: &str = "Client operation latency";
    const ID: &str = "latency";
    if ops.is_empty() {
        return no_data(TITLE, "no client operations in the history", ID, periods, axis);
    }
    let mut groups: BTreeMap<u8, Vec<Point>> = BTreeMap::new();
    let outcome_of = |o: &ClientOp<'_>| match o.completion {
        Some((Type::Ok, _)) => Outcome::Ok,
        Some((Type::Fail, _)) => Outcome::Fail,
        Some((_, _)) => Outcome::Info,
        None => Outcome::Unknown,
    };
    let order = |o: Outcome| match o {
        Outcome::Ok => 0u8,
        Outcome::Unknown => 1,
        Outcome::Info => 2,
        Outcome::Fail => 3,
    };
    let mut fs: BTreeSet<F> = BTreeSet::new();
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for o in ops {
        let done = o.completion.map_or(axis.end_ns, |(_, t)| t);
        let lat_ms = (done.saturating_sub(o.invoke_ns) as f64 / NS_PER_MS).max(1e-3);
        lo = lo.min(lat_ms);
        hi = hi.max(lat_ms);
        fs.insert(o.f.clone());
        groups.entry(order(outcome_of(o))).or_default().push(Point {
            t_ns: o.invoke_ns,
            lat_ms,
            shape: shape_of(&o.f),
        });
    }
    let count = |o: Outcome| groups.get(&order(o)).map_or(0, Vec::len);
    let (n_ok, n_fail, n_info, n_unknown) =
        (count(Outcome::Ok), count(Outcome::Fail), count(Outcome::Info), count(Outcome::Unknown));
    let n_other = n_fail + n_info + n_unknown;

    // Thin deterministically: every k-th ok point; fail/info/unknown all kept unless they alone
    // exceed the budget.
    let ok_step = n_ok.div_ceil(MAX_POINTS.saturating_sub(n_other).max(MAX_POINTS / 10)).max(1);
    let other_step = n_other.div_ceil(MAX_POINTS).max(1);
    let mut subtitle = format!("{} operations: {n_ok} ok, {n_fail} fail, {n_info} info", ops.len());
    if n_unknown > 0 {
        let _ = write!(subtitle, ", {n_unknown} never completed (plotted at run end)");
    }
    if ok_step > 1 {
        let shown = n_ok.div_ceil(ok_step);
        let _ = write!(subtitle, "; 1 in {ok_step} ok points shown ({shown} of {n_ok})");
        if other_step == 1 {
            subtitle.push_str(", all others");
        }
    }
    if other_step > 1 {
        let _ = write!(subtitle, "; 1 in {other_step} fail/info points shown");
    }

    let mut s = begin(TITLE, &subtitle, ID);
    axis.draw(&mut s);
    // Log y axis between 1-2-5 values with some headroom, so no point sits on the frame.
    let (lo_v, hi_v) = (floor_125(lo / 1.15), ceil_125(hi * 1.15));
    let (l0, l1) = (value_125(lo_v).log10(), value_125(hi_v).log10());
    let y = |ms: f64| BOTTOM - (ms.log10() - l0) / (l1 - l0) * (BOTTOM - TOP);
    let decades = l1 - l0;
    for e in (l0.floor() as i32)..=(l1.ceil() as i32) {
        for m in [1, 2, 5] {
            let v = value_125((m, e));
            if v < value_125(lo_v) * 0.999 || v > value_125(hi_v) * 1.001 {
                continue;
            }
            let yy = y(v);
            let labelled = m == 1 || (m, e) == lo_v || (m, e) == hi_v || decades <= 2.0;
            if !labelled && decades > 4.0 {
                continue;
            }
            let dash = if m == 1 { "" } else { r#" stroke-dasharray="2 3""# };
            let _ = write!(s, r#"<line x1="{LEFT}" y1="{yy:.1}" x2="{RIGHT}" y2="{yy:.1}" stroke="{GRID}"{dash}/>"#);
            if labelled {
                let _ = write!(
                    s,
                    r#"<text x="{}" y="{:.1}" font-size="11" fill="{MUTED}" text-anchor="end">{}</text>"#,
                    LEFT - 6.0,
                    yy + 4.0,
                    fmt_125_ms((m, e))
                );
            }
        }
    }
    y_label(&mut s, "latency (log scale)");
    draw_bands(&mut s, periods, axis, ID);

    for (&key, points) in &groups {
        let (class, paint, r, step) = match key {
            0 => ("points-ok", format!(r#"fill="{OK}" fill-opacity="0.55""#), 2.2, ok_step),
            1 => ("points-unknown", format!(r#"fill="none" stroke="{INFO}" stroke-width="1.2""#), 3.0, other_step),
            2 => ("points-info", format!(r#"fill="{INFO}" fill-opacity="0.9""#), 3.0, other_step),
            _ => ("points-fail", format!(r#"fill="{FAIL}" fill-opacity="0.9""#), 3.0, other_step),
        };
        let _ = write!(s, r#"<g class="{class}" clip-path="url(#{ID}-plot)" {paint}>"#);
        for p in points.iter().step_by(step) {
            marker(&mut s, p.shape, axis.x(p.t_ns), y(p.lat_ms), r);
        }
        s.push_str("</g>\n");
    }

    let mut keys: Vec<(Key, String)> = Vec::new();
    let outcomes = [
        (OK, false, "ok", n_ok),
        (FAIL, false, "fail", n_fail),
        (INFO, false, "info", n_info),
        (INFO, true, "never completed", n_unknown),
    ];
    for (color, hollow, label, n) in outcomes {
        if n > 0 {
            keys.push((Key::Marker { shape: Shape::Circle, color, hollow }, format!("{label}: {n}")));
        }
    }
    if fs.len() > 1 {
        for f in &fs {
            keys.push((Key::Marker { shape: shape_of(f), color: "#555555", hollow: false }, f_name(f).to_string()));
        }
    }
    keys.extend(fault_keys(periods));
    legend(&mut s, &keys);
    finish(s)
}

/// A 1-2-5 value `m·10^e`.
type V125 = (u32, i32);

fn value_125((m, e): V125) -> f64 {
    f64::from(m) * 10f64.powi(e)
}

/// The smallest 1-2-5 value at least `x` (> 0).
fn ceil_125(x: f64) -> V125 {
    let e0 = x.log10().floor() as i32;
    (e0 - 1..=e0 + 1)
        .flat_map(|e| [1, 2, 5].map(|m| (m, e)))
        .find(|v| value_125(*v) >= x * 0.999_999)
        .unwrap_or((1, e0 + 2))
}

/// The largest 1-2-5 value at most `x` (> 0).
fn floor_125(x: f64) -> V125 {
    let e0 = x.log10().floor() as i32;
    (e0 - 1..=e0 + 1)
        .rev()
        .flat_map(|e| [5, 2, 1].map(|m| (m, e)))
        .find(|v| value_125(*v) <= x * 1.000_001)
        .unwrap_or((1, e0 - 2))
}

/// `m·10^e` milliseconds as a label: "0.05 ms", "2 ms", "500 ms", "1 s", "20 s".
fn fmt_125_ms((m, e): V125) -> String {
    match e {
        e if e >= 3 => format!("{} s", u64::from(m) * 10u64.pow(e.unsigned_abs() - 3)),
        e if e >= 0 => format!("{} ms", u64::from(m) * 10u64.pow(e.unsigned_abs())),
        e => format!("0.{}{m} ms", "0".repeat(e.unsigned_abs() as usize - 1)),
    }
}

fn line_color(f: &F) -> &'static str {
    match f {
        F::Send => "#1f77b4",
        F::Deliver => "#9467bd",
        F::Read => "#2ca02c",
        F::Resend => "#ff7f0e",
        F::FinalRead => "#8c564b",
        F::FinalSend => "#17becf",
        F::Subscribe => "#e377c2",
        _ => "#7f7f7f",
    }
}

/// A step line through per-second buckets.
fn step_line(s: &mut String, buckets: &[u64], axis: &TimeAxis, y: &dyn Fn(f64) -> f64, paint: &str) {
    let mut points = String::new();
    for (i, &c) in buckets.iter().enumerate() {
        let t0 = (i as u64).saturating_mul(1_000_000_000);
        let t1 = t0.saturating_add(1_000_000_000).min(axis.end_ns.max(t0));
        let yy = y(c as f64);
        let _ = write!(points, "{:.1},{yy:.1} {:.1},{yy:.1} ", axis.x(t0), axis.x(t1));
    }
    let _ = writeln!(s, r#"<polyline fill="none" {paint} points="{}"/>"#, points.trim_end());
}

fn throughput_svg(history: &[Op], periods: &[Window], axis: &TimeAxis) -> String {
    const TITLE: &str = "Throughput: ok completions per second";
    const ID: &str = "throughput";
    let n_buckets = (axis.end_ns / 1_000_000_000 + 1) as usize;
    let mut lines: BTreeMap<F, Vec<u64>> = BTreeMap::new();
    let mut errors = vec![0u64; n_buckets];
    for op in history.iter().filter(|op| op.process != Process::NEMESIS) {
        let bucket = (op.time / 1_000_000_000) as usize;
        match op.kind {
            Type::Ok => {
                if let Some(c) = lines.entry(op.f.clone()).or_insert_with(|| vec![0; n_buckets]).get_mut(bucket) {
                    *c += 1;
                }
            }
            Type::Fail | Type::Info if is_timed(&op.f) => {
                if let Some(c) = errors.get_mut(bucket) {
                    *c += 1;
                }
            }
            _ => {}
        }
    }
    // Subscriptions are events, not throughput.
    lines.remove(&F::Subscribe);
    if lines.is_empty() && errors.iter().all(|c| *c == 0) {
        return no_data(TITLE, "no client completions in the history", ID, periods, axis);
    }
    let total: u64 = lines.values().flatten().sum();
    let n_errors: u64 = errors.iter().sum();
    let subtitle =
        format!("1-second buckets by completion time; {total} ok completions, {n_errors} fail/info (dashed)");
    let max = lines.values().chain(std::iter::once(&errors)).flatten().copied().max().unwrap_or(0);
    let mut s = begin(TITLE, &subtitle, ID);
    axis.draw(&mut s);
    let top = draw_linear_y(&mut s, max as f64, "completions per second");
    draw_bands(&mut s, periods, axis, ID);
    let y = |v: f64| BOTTOM - v / top * (BOTTOM - TOP);
    let mut keys: Vec<(Key, String)> = Vec::new();
    // Deliveries first, wide and light: they often track sends exactly and would hide them.
    let mut ordered: Vec<(&F, &Vec<u64>)> = lines.iter().collect();
    ordered.sort_by_key(|(f, _)| **f != F::Deliver);
    for (f, buckets) in ordered {
        let color = line_color(f);
        let width =
            if *f == F::Deliver { r#"stroke-width="4" stroke-opacity="0.45""# } else { r#"stroke-width="1.6""# };
        step_line(
            &mut s,
            buckets,
            axis,
            &y,
            &format!(r#"class="line-{}" stroke="{color}" {width} stroke-linejoin="round""#, f_name(f)),
        );
    }
    for f in lines.keys() {
        let key = Key::Line { color: line_color(f), dashed: false, wide: *f == F::Deliver };
        keys.push((key, format!("{} ok", f_name(f))));
    }
    if n_errors > 0 {
        step_line(
            &mut s,
            &errors,
            axis,
            &y,
            &format!(r#"class="line-errors" stroke="{FAIL}" stroke-width="1.4" stroke-dasharray="5 3""#),
        );
        keys.push((Key::Line { color: FAIL, dashed: true, wide: false }, "fail + info".into()));
    }
    keys.extend(fault_keys(periods));
    legend(&mut s, &keys);
    finish(s)
}

fn unseen_svg(history: &[Op], ops: &[ClientOp<'_>], periods: &[Window], axis: &TimeAxis) -> String {
    const TITLE: &str = "Acked but unseen: ok sends not yet delivered to any subscriber";
    const ID: &str = "unseen";
    let series = unseen_series(history, ops, axis.end_ns);
    if series.is_empty() {
        return no_data(TITLE, "no acknowledged sends in the history", ID, periods, axis);
    }
    let (peak_t, peak) = series.iter().fold((0, 0), |best, &(t, n)| if n > best.1 { (t, n) } else { best });
    let at_end = series.last().map_or(0, |p| p.1);
    let step_ms = series.get(1).map_or(UNSEEN_STEP_NS, |p| p.0) / 1_000_000;
    let subtitle = format!(
        "sampled every {step_ms} ms; peak {peak} at {:.1} s; {at_end} still undelivered at the end",
        peak_t as f64 / NS_PER_S
    );
    let mut s = begin(TITLE, &subtitle, ID);
    axis.draw(&mut s);
    let top = draw_linear_y(&mut s, peak as f64, "acked, not yet delivered");
    draw_bands(&mut s, periods, axis, ID);
    let y = |v: f64| BOTTOM - v / top * (BOTTOM - TOP);
    let mut line = String::new();
    for &(t, n) in &series {
        let _ = write!(line, "{:.1},{:.1} ", axis.x(t), y(n as f64));
    }
    let line = line.trim_end();
    let (first_x, last_x) = (axis.x(series.first().map_or(0, |p| p.0)), axis.x(axis.end_ns));
    let color = "#9467bd";
    let _ = writeln!(
        s,
        r#"<polygon class="unseen-area" fill="{color}" fill-opacity="0.2" points="{first_x:.1},{BOTTOM} {line} {last_x:.1},{BOTTOM}"/>"#
    );
    let _ = writeln!(
        s,
        r#"<polyline class="unseen-line" fill="none" stroke="{color}" stroke-width="1.6" stroke-linejoin="round" points="{line}"/>"#
    );
    let mut keys = vec![(Key::Line { color, dashed: false, wide: false }, "acked, unseen".to_string())];
    keys.extend(fault_keys(periods));
    legend(&mut s, &keys);
    finish(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Builds histories from events in any order: sorted by time (stably), indexed densely.
    #[derive(Default)]
    struct Builder {
        ops: Vec<Op>,
    }

    impl Builder {
        fn op(&mut self, time_ms: f64, kind: Type, process: Process, f: F, value: Value) -> &mut Self {
            self.ops.push(Op { index: 0, time: (time_ms * 1e6) as u64, kind, process, f, value, node: None });
            self
        }

        fn client(&mut self, p: u64, f: F, t0_ms: f64, t1_ms: f64, kind: Type, value: Value) -> &mut Self {
            self.op(t0_ms, Type::Invoke, Process::Client(p), f.clone(), value.clone());
            self.op(t1_ms, kind, Process::Client(p), f, value)
        }

        fn send(&mut self, p: u64, text: &str, t0_ms: f64, t1_ms: f64, kind: Type) -> &mut Self {
            self.client(p, F::Send, t0_ms, t1_ms, kind, json!({"conversation": 1, "text": text}))
        }

        fn deliver(&mut self, text: &str, t_ms: f64) -> &mut Self {
            self.op(t_ms, Type::Ok, Process::Client(1000), F::Deliver, json!({"conversation": 1, "text": text}))
        }

        fn nemesis(&mut self, f: F, t0_ms: f64, t1_ms: f64, nodes: &[u64]) -> &mut Self {
            self.op(t0_ms, Type::Invoke, Process::NEMESIS, f.clone(), json!({ "nodes": nodes }));
            self.op(t1_ms, Type::Info, Process::NEMESIS, f, json!({"nodes": nodes, "outcome": "done"}))
        }

        fn build(&mut self) -> Vec<Op> {
            let mut ops = std::mem::take(&mut self.ops);
            ops.sort_by_key(|op| op.time);
            for (i, op) in ops.iter_mut().enumerate() {
                op.index = i as u64;
            }
            ops
        }
    }

    /// A kill of n1 (2–3.5 s) and a partition (4–6 s); sends every 100 ms from 3 processes,
    /// delivered 10 ms after the ack except during the partition (delivered after the heal).
    fn small_history() -> Vec<Op> {
        let mut b = Builder::default();
        let mut seq = 0;
        for step in 0..100 {
            for p in 0..3u64 {
                let t = f64::from(step) * 100.0 + p as f64 * 7.0;
                let text = format!("m{seq}");
                seq += 1;
                if (2000.0..3000.0).contains(&t) && p == 1 {
                    b.send(p, &text, t, t + 50.0, Type::Fail);
                } else if (4000.0..6000.0).contains(&t) {
                    b.send(p, &text, t, t + 20.0, Type::Ok).deliver(&text, 6050.0);
                } else {
                    b.send(p, &text, t, t + 5.0, Type::Ok).deliver(&text, t + 15.0);
                }
            }
        }
        b.client(7, F::Read, 500.0, 512.0, Type::Ok, json!({"conversation": 1}));
        b.client(8, F::Read, 2500.0, 3500.0, Type::Info, json!({"conversation": 1}));
        b.nemesis(F::Kill, 2000.0, 2010.0, &[1]).nemesis(F::Start, 3000.0, 3500.0, &[1]);
        b.nemesis(F::Partition, 4000.0, 4001.0, &[3]).nemesis(F::Heal, 6000.0, 6001.0, &[]);
        b.build()
    }

    /// Checks that a document is well-formed XML in the subset we emit: balanced tags, one root,
    /// quoted attributes, and `&` only in entities.
    fn well_formed(doc: &str) -> Result<(), String> {
        fn entities_ok(text: &str) -> Result<(), String> {
            for (i, _) in text.match_indices('&') {
                let rest = &text[i + 1..];
                let ok = ["amp;", "lt;", "gt;", "quot;", "apos;"].iter().any(|e| rest.starts_with(e))
                    || (rest.starts_with('#') && rest.find(';').is_some_and(|j| j > 1));
                if !ok {
                    return Err(format!("bare & near {:?}", &text[i..(i + 10).min(text.len())]));
                }
            }
            if text.contains('<') {
                return Err("< in text".into());
            }
            Ok(())
        }
        let mut stack: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut rest = doc;
        while let Some(lt) = rest.find('<') {
            entities_ok(&rest[..lt])?;
            if stack.is_empty() && !rest[..lt].trim().is_empty() {
                return Err("text outside the root".into());
            }
            rest = &rest[lt..];
            if let Some(r) = rest.strip_prefix("<?") {
                rest = &r[r.find("?>").ok_or("unterminated <?")? + 2..];
                continue;
            }
            if let Some(r) = rest.strip_prefix("<!--") {
                rest = &r[r.find("-->").ok_or("unterminated comment")? + 3..];
                continue;
            }
            // Find the tag's end outside quotes.
            let mut quote = None;
            let mut end = None;
            for (i, c) in rest.char_indices().skip(1) {
                match (quote, c) {
                    (None, '"' | '\'') => quote = Some(c),
                    (Some(q), c) if c == q => quote = None,
                    (None, '>') => {
                        end = Some(i);
                        break;
                    }
                    (None, '<') => return Err("< inside a tag".into()),
                    _ => {}
                }
            }
            let end = end.ok_or("unterminated tag")?;
            let tag = &rest[1..end];
            entities_ok(tag)?;
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("unexpected </{name}>"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
            } else {
                let self_closing = tag.ends_with('/');
                let name: String = tag.chars().take_while(|c| c.is_alphanumeric() || *c == '-' || *c == ':').collect();
                if name.is_empty() {
                    return Err(format!("bad tag <{tag}>"));
                }
                if stack.is_empty() {
                    roots += 1;
                }
                if !self_closing {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        if !rest.trim().is_empty() {
            return Err("trailing text".into());
        }
        if let Some(open) = stack.pop() {
            return Err(format!("<{open}> never closed"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(())
    }

    fn assert_well_formed(name: &str, doc: &str) {
        if let Err(e) = well_formed(doc) {
            panic!("{name} is not well-formed: {e}\n{}", &doc[..doc.len().min(2000)]);
        }
        assert!(doc.contains("<svg") && doc.contains("font-family=\"sans-serif\""), "{name}");
    }

    fn all(p: &Plots) -> [(&'static str, &str); 3] {
        [("latency", &p.latency_svg), ("throughput", &p.throughput_svg), ("unseen", &p.unseen_svg)]
    }

    /// The elements drawn inside the first `<g class="{class}" ...>` group.
    fn group_elements(doc: &str, class: &str) -> usize {
        let Some(start) = doc.find(&format!(r#"<g class="{class}""#)) else { return 0 };
        let body = &doc[start..];
        let body = &body[..body.find("</g>").unwrap_or(body.len())];
        body.matches("<circle").count() + body.matches("<rect").count() + body.matches("<polygon").count()
    }

    #[test]
    fn the_checker_rejects_malformed_documents() {
        assert!(well_formed("<svg><g></g><rect/></svg>").is_ok());
        assert!(well_formed("<svg><g></svg></g>").is_err());
        assert!(well_formed("<svg><g></svg>").is_err());
        assert!(well_formed("<svg>a & b</svg>").is_err());
        assert!(well_formed("<svg>a &amp; b</svg><svg/>").is_err());
        assert!(well_formed(r#"<svg x="a>b"></svg>"#).is_ok());
    }

    #[test]
    fn log_axis_bounds_and_labels() {
        assert_eq!(ceil_125(1150.0), (2, 3));
        assert_eq!(ceil_125(1000.0), (1, 3));
        assert_eq!(ceil_125(9.2), (1, 1));
        assert_eq!(floor_125(1.0 / 1.15), (5, -1));
        assert_eq!(floor_125(0.03), (2, -2));
        assert_eq!(fmt_125_ms((2, 3)), "2 s");
        assert_eq!(fmt_125_ms((5, 2)), "500 ms");
        assert_eq!(fmt_125_ms((1, 0)), "1 ms");
        assert_eq!(fmt_125_ms((5, -2)), "0.05 ms");
    }

    #[test]
    fn escapes_text() {
        assert_eq!(esc(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&apos;");
    }

    #[test]
    fn fault_periods_pair_faults_with_their_ends() {
        let h = small_history();
        let periods = fault_periods(&h);
        assert_eq!(
            periods,
            vec![
                FaultPeriod { f: F::Kill, start_ns: 2_000_000_000, end_ns: Some(3_500_000_000), nodes: vec![1] },
                FaultPeriod { f: F::Partition, start_ns: 4_000_000_000, end_ns: Some(6_001_000_000), nodes: vec![3] },
            ]
        );
    }

    #[test]
    fn fault_periods_match_nodes_and_fall_back_to_any_end() {
        let mut b = Builder::default();
        b.nemesis(F::Kill, 0.0, 1.0, &[1]).nemesis(F::PowerFail, 10.0, 11.0, &[2]);
        b.nemesis(F::Start, 20.0, 21.0, &[2]).nemesis(F::Start, 30.0, 31.0, &[1]);
        // Two nodes at once, restored one by one: ends when the last comes back.
        b.nemesis(F::Kill, 40.0, 41.0, &[1, 2]).nemesis(F::Start, 50.0, 51.0, &[1]).nemesis(F::Start, 60.0, 61.0, &[2]);
        // A start naming other nodes ends whatever it can end.
        b.nemesis(F::Corrupt, 70.0, 71.0, &[3]).nemesis(F::Start, 80.0, 81.0, &[1]);
        // Pause ends at resume (not start); clock skew is never reset; an invoke with no completion.
        b.nemesis(F::Pause, 90.0, 91.0, &[2]).nemesis(F::Start, 95.0, 96.0, &[2]);
        b.op(100.0, Type::Invoke, Process::NEMESIS, F::Resume, json!({"nodes": [2]}));
        b.nemesis(F::ClockSkew, 110.0, 111.0, &[3]);
        let ms = |t: u64| t * 1_000_000;
        let got: Vec<(F, u64, Option<u64>)> =
            fault_periods(&b.build()).into_iter().map(|p| (p.f, p.start_ns, p.end_ns)).collect();
        assert_eq!(
            got,
            vec![
                (F::Kill, ms(0), Some(ms(31))),
                (F::PowerFail, ms(10), Some(ms(21))),
                (F::Kill, ms(40), Some(ms(61))),
                (F::Corrupt, ms(70), Some(ms(81))),
                (F::Pause, ms(90), Some(ms(100))),
                (F::ClockSkew, ms(110), None),
            ]
        );
    }

    #[test]
    fn the_final_heal_ends_every_fault() {
        let ms = |t: u64| t * 1_000_000;
        let mut b = Builder::default();
        b.nemesis(F::ClockSkew, 0.0, 1.0, &[3]).nemesis(F::Kill, 10.0, 11.0, &[2]).nemesis(F::Pause, 12.0, 13.0, &[1]);
        b.nemesis(F::Partition, 14.0, 15.0, &[1, 2, 3]);
        b.op(30.0, Type::Invoke, Process::NEMESIS, F::Heal, json!({"final": true}));
        b.op(35.0, Type::Info, Process::NEMESIS, F::Heal, json!({"final": true, "outcome": "healed"}));
        let periods = fault_periods(&b.build());
        assert_eq!(periods.len(), 4);
        assert!(periods.iter().all(|p| p.end_ns == Some(ms(35))), "{periods:?}");
    }

    #[test]
    fn fault_labels_name_nodes_and_variant() {
        let mut b = Builder::default();
        let value = json!({"variant": "bridge", "drops": [[1, 3], [3, 1]], "nodes": [1, 3]});
        b.op(0.0, Type::Invoke, Process::NEMESIS, F::Partition, value);
        b.op(1.0, Type::Info, Process::NEMESIS, F::Partition, json!({"outcome": "partitioned"}));
        b.send(1, "a", 0.0, 3.0, Type::Ok).deliver("a", 4.0);
        let p = plots(&b.build());
        for (name, doc) in all(&p) {
            assert!(doc.contains(">partition n1,n3 (bridge)</text>"), "{name}");
        }
    }

    #[test]
    fn plots_are_well_formed_and_shade_every_fault() {
        let h = small_history();
        let p = plots(&h);
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert_eq!(doc.matches(r#"class="fault-band""#).count(), 2, "{name}");
            assert_eq!(doc.matches(r#"class="fault-label""#).count(), 2, "{name}");
            assert!(doc.contains(">kill n1</text>") && doc.contains(">partition n3</text>"), "{name}");
            assert!(!doc.contains("no data"), "{name}");
        }
        // 300 sends + 2 reads; 10 failed sends, 1 info read.
        assert_eq!(group_elements(&p.latency_svg, "points-ok"), 291);
        assert_eq!(group_elements(&p.latency_svg, "points-fail"), 10);
        assert_eq!(group_elements(&p.latency_svg, "points-info"), 1);
        assert!(p.latency_svg.contains("302 operations: 291 ok, 10 fail, 1 info"), "{}", &p.latency_svg[..600]);
        assert!(
            p.throughput_svg.contains(r#"class="line-send""#) && p.throughput_svg.contains(r#"class="line-deliver""#)
        );
        assert!(p.throughput_svg.contains(r#"class="line-errors""#));

        // An unended fault adds a band reaching the end of the run.
        let mut h2 = h.clone();
        let end = run_end(&h2);
        h2.push(Op {
            index: h2.len() as u64,
            time: end - 500_000_000,
            kind: Type::Invoke,
            process: Process::NEMESIS,
            f: F::Pause,
            value: json!({"nodes": [2]}),
            node: None,
        });
        let p2 = plots(&h2);
        for (name, doc) in all(&p2) {
            assert_well_formed(name, doc);
            assert_eq!(doc.matches(r#"class="fault-band""#).count(), 3, "{name}");
            assert!(doc.contains("never ended"), "{name}");
        }
    }

    #[test]
    fn unseen_rises_during_the_partition_and_drops_to_zero_after_all_deliveries() {
        let h = small_history();
        let ops = client_ops(&h);
        let series = unseen_series(&h, &ops, run_end(&h));
        assert_eq!(series.first().map(|p| p.0), Some(0));
        assert_eq!(series.last(), Some(&(run_end(&h), 0)));
        let at = |ms: u64| series.iter().find(|p| p.0 == ms * 1_000_000).map(|p| p.1);
        assert_eq!(at(5_800), Some(54), "sends acked during the partition are unseen until the heal");
        assert_eq!(at(1_000), Some(0));
        assert!(series.iter().filter(|p| p.0 >= 6_100_000_000).all(|p| p.1 == 0));

        // A send that is never delivered stays unseen at the end.
        let mut b = Builder::default();
        b.send(1, "lost", 0.0, 10.0, Type::Ok).send(1, "seen", 20.0, 30.0, Type::Ok).deliver("seen", 35.0);
        b.send(2, "failed", 0.0, 10.0, Type::Fail).op(1000.0, Type::Ok, Process::Client(9), F::Subscribe, json!({}));
        let h = b.build();
        let series = unseen_series(&h, &client_ops(&h), run_end(&h));
        assert_eq!(series.last(), Some(&(1_000_000_000, 1)));
        assert!(plots(&h).unseen_svg.contains("1 still undelivered at the end"));
    }

    #[test]
    fn many_points_are_thinned_but_failures_are_all_kept() {
        let mut b = Builder::default();
        for i in 0..50_000u64 {
            let p = i % 16;
            let t = i as f64 * 2.0;
            let kind = if i % 50 == 0 { Type::Fail } else { Type::Ok };
            b.send(p, &format!("m{i}"), t, t + 1.0 + (i % 7) as f64, kind);
        }
        let h = b.build();
        assert_eq!(h.len(), 100_000);
        let p = plots(&h);
        assert_well_formed("latency", &p.latency_svg);
        let shown_ok = group_elements(&p.latency_svg, "points-ok");
        assert!((MAX_POINTS / 2..=MAX_POINTS).contains(&shown_ok), "{shown_ok}");
        assert_eq!(group_elements(&p.latency_svg, "points-fail"), 1_000);
        assert!(p.latency_svg.contains("1 in 3 ok points shown (16334 of 49000), all others"));
        let elements = p.latency_svg.matches('<').count();
        assert!(elements < MAX_POINTS + 2_000, "{elements}");
        assert_well_formed("throughput", &p.throughput_svg);
        assert_well_formed("unseen", &p.unseen_svg);
    }

    #[test]
    fn empty_and_fault_free_histories_render() {
        let p = plots(&[]);
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert!(doc.contains("no data"), "{name}");
            assert!(!doc.contains("fault-band"), "{name}");
        }
        assert!(fault_periods(&[]).is_empty());
        let summary = summary_text(&[], &Value::Null);
        assert!(summary.contains("faults: none") && summary.contains("checker: unknown"), "{summary}");

        let mut b = Builder::default();
        b.send(1, "a", 0.0, 3.0, Type::Ok);
        let p = plots(&b.build());
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert!(!doc.contains("fault-band") && !doc.contains("no data"), "{name}");
        }

        // Only nemesis ops: bands, but no data.
        let mut b = Builder::default();
        b.nemesis(F::Partition, 0.0, 1.0, &[2]);
        let p = plots(&b.build());
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert!(doc.contains("no data") && doc.contains("fault-band"), "{name}");
        }
    }

    #[test]
    fn operations_that_never_complete_are_plotted_hollow() {
        let mut b = Builder::default();
        b.send(1, "a", 0.0, 3.0, Type::Ok);
        b.op(1.0, Type::Invoke, Process::Client(2), F::Send, json!({"text": "b"}));
        b.op(2000.0, Type::Ok, Process::Client(3), F::Deliver, json!({"text": "a"}));
        let p = plots(&b.build());
        assert_eq!(group_elements(&p.latency_svg, "points-unknown"), 1);
        assert!(p.latency_svg.contains("1 never completed"));
    }

    #[test]
    fn summary_reports_counts_faults_verdict_and_latency() {
        let h = small_history();
        let checker = json!({"valid": "invalid", "anomaly_counts": {"lost": 2, "duplicated": 0, "reordered": 1}});
        let s = summary_text(&h, &checker);
        assert!(s.contains("run: 9.9 s, 902 history ops"), "{s}");
        assert!(s.contains("  send: 300 invoke, 290 ok, 10 fail"), "{s}");
        assert!(s.contains("  read: 2 invoke, 1 ok, 1 info"), "{s}");
        assert!(s.contains("  deliver: 290 ok"), "{s}");
        assert!(s.contains("faults: kill x1, partition x1"), "{s}");
        assert!(s.contains("checker: invalid; anomalies: lost 2, reordered 1"), "{s}");
        assert!(s.contains("send latency (ok, n=290): p50 5.00 ms, p99 20.0 ms, max 20.0 ms"), "{s}");
        assert!(s.lines().count() <= 10, "{s}");

        let s = summary_text(&h, &json!({"valid": true, "anomaly_counts": {"lost": 0}}));
        assert!(s.contains("checker: valid; no anomalies"), "{s}");
        let s = summary_text(&h, &json!({"valid": 3, "anomaly_counts": "x"}));
        assert!(s.contains("checker: unknown; anomaly counts not reported"), "{s}");
    }

    /// A 30-second run with a kill of n1 and a partition isolating n3, with noisy latencies.
    fn example_history() -> Vec<Op> {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut b = Builder::default();
        let (kill, partition) = ((8_000.0, 13_000.0), (18_000.0, 23_000.0));
        let within = |t: f64, w: (f64, f64)| t >= w.0 && t < w.1;
        let mut seq = 0u64;
        for p0 in 0..6u64 {
            let (mut p, mut t) = (p0, rand() * 50.0);
            while t < 29_000.0 {
                let node = p0 % 3 + 1;
                let text = format!("p{p0}-{seq}");
                seq += 1;
                let mut lat = 2.0 + rand() * 6.0 + if rand() < 0.02 { 40.0 * rand() } else { 0.0 };
                let mut kind = Type::Ok;
                if (within(t, kill) && node == 1) || (within(t, partition) && node == 3) {
                    if rand() < 0.5 {
                        kind = Type::Fail;
                        lat = 200.0 + rand() * 100.0;
                    } else {
                        kind = Type::Info;
                        lat = 1_000.0;
                    }
                } else if within(t, partition) && t < partition.0 + 1_500.0 {
                    lat += 300.0 * rand();
                }
                b.client(p, F::Send, t, t + lat, kind, json!({"conversation": 1, "text": text}));
                if kind == Type::Ok {
                    let mut d = t + lat + 1.0 + rand() * 4.0;
                    if within(t, partition) && rand() < 0.7 {
                        d = partition.1 + 300.0 + rand() * 1_500.0;
                    }
                    b.deliver(&text, d);
                }
                if kind == Type::Info {
                    p += 100;
                }
                t += lat + 20.0 + rand() * 40.0;
            }
        }
        let mut t = 250.0;
        while t < 29_000.0 {
            let lat = 4.0 + rand() * 10.0;
            b.client(50, F::Read, t, t + lat, Type::Ok, json!({"conversation": 1}));
            if rand() < 0.05 {
                b.client(51, F::Resend, t, t + 3.0, Type::Ok, json!({"conversation": 1, "text": "p0-0"}));
            }
            t += 500.0;
        }
        for n in 1..=3u64 {
            let t = 29_500.0 + n as f64 * 10.0;
            b.client(60 + n, F::FinalRead, t, t + 30.0 + rand() * 20.0, Type::Ok, json!({"conversation": 1}));
        }
        b.client(70, F::FinalSend, 29_700.0, 29_712.0, Type::Ok, json!({"conversation": 1, "text": "final"}));
        b.deliver("final", 29_716.0);
        // Nemesis values shaped like the runner's.
        let nemesis = |b: &mut Builder, f: F, t0: f64, t1: f64, value: Value| {
            b.op(t0, Type::Invoke, Process::NEMESIS, f.clone(), value.clone());
            b.op(t1, Type::Info, Process::NEMESIS, f, value);
        };
        nemesis(&mut b, F::Kill, kill.0, kill.0 + 20.0, json!({"nodes": [1], "variant": "leader"}));
        nemesis(&mut b, F::Start, kill.1, kill.1 + 800.0, json!({"nodes": [1]}));
        let drops = json!({"variant": "isolate-one", "drops": [[3, 1], [1, 3], [3, 2], [2, 3]], "nodes": [1, 2, 3]});
        nemesis(&mut b, F::Partition, partition.0, partition.0 + 10.0, drops);
        nemesis(&mut b, F::Heal, partition.1, partition.1 + 20.0, json!({}));
        nemesis(&mut b, F::Pause, 26_000.0, 26_005.0, json!({"nodes": [2], "variant": "one"}));
        nemesis(&mut b, F::Heal, 29_100.0, 29_300.0, json!({"final": true}));
        b.build()
    }

    /// Renders the example; with `CONVOY_REPORT_EXAMPLE_DIR` set, writes `example-*.svg` there.
    #[test]
    fn example_plots_render() {
        let h = example_history();
        let p = plots(&h);
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert_eq!(doc.matches(r#"class="fault-band""#).count(), 3, "{name}");
            assert!(!doc.contains("never ended"), "{name}");
        }
        let checker = json!({"valid": "valid", "anomaly_counts": {}});
        let summary = summary_text(&h, &checker);
        if let Some(dir) = std::env::var_os("CONVOY_REPORT_EXAMPLE_DIR") {
            let dir = std::path::PathBuf::from(dir);
            for (name, doc) in all(&p) {
                std::fs::write(dir.join(format!("example-{name}.svg")), doc).expect("write example");
            }
            std::fs::write(dir.join("example-summary.txt"), &summary).expect("write summary");
        }
    }
}
