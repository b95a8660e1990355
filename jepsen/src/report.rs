//! Plots and a short human summary of a recorded [history](crate::history).
//!
//! Everything here is pure: a history goes in, standalone SVG documents (strings) and text come
//! out. Three plots share one time axis (seconds since the start of the run) and one layout, so
//! they line up when stacked:
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
//! with the nemesis `f` and its nodes; a legend to the right of each plot names the series and
//! the kinds of fault.
//!
//! The data (fault windows, latency groups, per-second buckets, the unseen curve, the summary)
//! is computed here; the drawing is [plotters]' with its SVG backend, writing into a `String`.
//! Marker shapes are one small custom element (`Marker`) so that a series can mix them. The
//! legend is drawn beside the plot by hand (plotters' own series labels stay inside the plot
//! area), and so are the fault labels, placed in rows that do not overlap.
//!
//! No font file is read, which matters on a fresh CI machine: plotters is built without its
//! `ttf` and `ab_glyph` features, so its font module is the "naive" one, which only *estimates*
//! text extents (0.7 em per character), and the SVG backend writes every title, tick, label and
//! legend entry as a `<text font-family="sans-serif">` element that the viewer renders with
//! whatever font it has. plotters uses the estimates to lay out tick labels; here they place
//! the fault labels and their backing. They are a little wide for sans-serif, which is the
//! safe side. (The backend writes `font-size` as the requested size divided by 1.24, which
//! `font()` undoes so that sizes here are pixels.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::{DashedPathElement, Drawable, PointCollection};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendCoord, DrawingErrorKind};
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

// Layout (pixels): the document, the plot area inside it, and where the legend starts.
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 400;
const LEFT: i32 = 72;
const RIGHT: i32 = 812;
const TOP: i32 = 58;
const BOTTOM: i32 = 348;
const LEGEND_X: i32 = 830;

// Colors.
const OK: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const FAIL: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const INFO: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x66, 0x66, 0x66);
const GRID: RGBColor = RGBColor(0xe6, 0xe6, 0xe6);
const LIGHT_GRID: RGBColor = RGBColor(0xf2, 0xf2, 0xf2);
const FRAME: RGBColor = RGBColor(0x99, 0x99, 0x99);
const SHAPE_KEY: RGBColor = RGBColor(0x55, 0x55, 0x55);
const UNSEEN: RGBColor = RGBColor(0x94, 0x67, 0xbd);

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

/// Notes of an undecided checker result shown in the summary, at most …
const SUMMARY_NOTES: usize = 3;
/// … each cut to this many characters.
const SUMMARY_NOTE_CHARS: usize = 240;

/// A few lines for a person: duration, operation counts, faults, the checker's verdict and
/// anomaly counts (and, when it is undecided, why), and send latencies.
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
    // An undecided run says why (the first few notes; all are in results.json).
    if valid == "unknown" {
        let notes = checker_json.get("notes").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for note in notes.iter().filter_map(Value::as_str).take(SUMMARY_NOTES) {
            let cut: String = note.chars().take(SUMMARY_NOTE_CHARS).collect();
            let more = if cut.len() < note.len() { " …" } else { "" };
            let _ = writeln!(s, "  note: {cut}{more}");
        }
    }

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
        F::CaughtUp => "caught-up",
        F::Truncated => "truncated",
        F::Kill => "kill",
        F::Stop => "stop",
        F::Start => "start",
        F::Pause => "pause",
        F::Resume => "resume",
        F::Partition => "partition",
        F::Heal => "heal",
        F::ClockSkew => "clock-skew",
        F::ClockReset => "clock-reset",
        F::PowerFail => "power-fail",
        F::Corrupt => "corrupt",
        F::Wipe => "wipe",
        F::Rebuild => "rebuild",
        F::Recover => "recover",
        F::Retention => "retention",
        F::Membership => "membership",
        F::Settle => "settle",
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
// Axes.

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

    /// A time in seconds, within the axis.
    fn s(&self, t_ns: u64) -> f64 {
        (t_ns as f64 / NS_PER_S).clamp(0.0, self.span_s)
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

/// A tick label of a linear axis (plotters picks round values): "0", "20", "0.5", "0.0002".
fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.6}");
    match s.trim_end_matches('0').trim_end_matches('.') {
        "-0" => "0".to_string(),
        t => t.to_string(),
    }
}

/// The top of a linear y axis from 0: a round number at least `max` (and at least 1).
fn linear_top(max: f64) -> f64 {
    let step = nice_step(max.max(1.0), 5.0).max(1.0);
    (max.max(1.0) / step).ceil() * step
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

/// A tick value of the latency axis (a 1-2-5 number of milliseconds) as a label.
fn fmt_ms_tick(ms: f64) -> String {
    let e = (ms.log10() + 1e-9).floor() as i32;
    fmt_125_ms(((ms / 10f64.powi(e)).round() as u32, e))
}

/// The log latency axis between 1-2-5 values with some headroom, so that no point sits on the
/// frame: its range, the labelled ticks (the decades, the ends, and every 1-2-5 value when it
/// spans at most two decades) and the unlabelled ones (none beyond four decades).
fn log_ticks(lo_ms: f64, hi_ms: f64) -> (V125, V125, Vec<f64>, Vec<f64>) {
    let (lo_v, hi_v) = (floor_125(lo_ms / 1.15), ceil_125(hi_ms * 1.15));
    let (l0, l1) = (value_125(lo_v).log10(), value_125(hi_v).log10());
    let decades = l1 - l0;
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    for e in (l0.floor() as i32)..=(l1.ceil() as i32) {
        for m in [1, 2, 5] {
            let v = value_125((m, e));
            if v < value_125(lo_v) * 0.999 || v > value_125(hi_v) * 1.001 {
                continue;
            }
            if m == 1 || (m, e) == lo_v || (m, e) == hi_v || decades <= 2.0 {
                bold.push(v);
            } else if decades <= 4.0 {
                light.push(v);
            }
        }
    }
    (lo_v, hi_v, bold, light)
}

// ---------------------------------------------------------------------------------------------
// Drawing: the frame every plot shares.

type DrawResult<T = ()> = Result<T, DrawingAreaErrorKind<std::io::Error>>;
type Root<'b> = DrawingArea<SVGBackend<'b>, Shift>;
type Chart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// A sans-serif font of `px` pixels. (The SVG backend writes `font-size` as the size / 1.24.)
fn font(px: f64) -> FontDesc<'static> {
    ("sans-serif", px * 1.24).into_font()
}

/// Draws one plot into a standalone SVG document. There should be no drawing error (the
/// backend writes into a `String` and text is only estimated, never rasterised); if there is
/// one, it is logged and written into the document, which plotters closes properly either way.
fn render(name: &str, draw: impl FnOnce(&Root<'_>) -> DrawResult) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn = root.fill(&WHITE).and_then(|()| draw(&root)).and_then(|()| root.present());
        if let Err(e) = drawn {
            tracing::warn!("the {name} plot is incomplete: {e}");
            let text = Text::new(format!("plot incomplete: {e}"), (LEFT, HEIGHT as i32 - 14), font(12.0).color(&FAIL));
            if let Err(e) = root.draw(&text).and_then(|()| root.present()) {
                tracing::warn!("cannot even say so in the {name} plot: {e}");
            }
        }
    }
    svg
}

/// Turns a tick value into its label.
type TickFormat<'f> = &'f dyn Fn(&f64) -> String;

/// The title and subtitle, and a chart over the plot area with its grid, ticks and axis
/// labels. The x axis is time; `y_axis` is the y axis' description and tick format (`None`
/// for no y axis).
fn frame<'a, 'b, Y>(
    root: &'a Root<'b>,
    title: &str,
    subtitle: &str,
    axis: &TimeAxis,
    y: Y,
    y_axis: Option<(&str, TickFormat<'_>)>,
) -> DrawResult<Chart<'a, 'b, Y::CoordDescType>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    root.draw(&Text::new(title, (LEFT, 10), font(16.0).style(FontStyle::Bold).color(&INK)))?;
    root.draw(&Text::new(subtitle, (LEFT, 32), font(12.0).color(&MUTED)))?;
    let mut chart = ChartBuilder::on(root)
        .margin_top(TOP)
        .margin_right(WIDTH as i32 - RIGHT)
        .margin_bottom(12)
        .margin_left(6)
        .x_label_area_size(HEIGHT as i32 - BOTTOM - 12)
        .y_label_area_size(LEFT - 6)
        .build_cartesian_2d(0.0..axis.span_s, y)?;
    let x_fmt = |v: &f64| fmt_tick(*v);
    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(GRID)
        .light_line_style(LIGHT_GRID)
        .axis_style(FRAME)
        .set_all_tick_mark_size(4)
        .max_light_lines(0)
        .label_style(font(11.0).color(&MUTED))
        .axis_desc_style(font(12.0).color(&INK))
        .x_labels(12)
        .y_labels(7)
        .x_desc("time since start (s)")
        .x_label_formatter(&x_fmt);
    match y_axis {
        Some((desc, fmt)) => mesh.y_desc(desc).y_label_formatter(fmt),
        None => mesh.disable_y_axis().disable_y_mesh(),
    };
    mesh.draw()?;
    Ok(chart)
}

fn fault_color(f: &F) -> RGBColor {
    match f {
        F::Kill => RGBColor(0x7f, 0x7f, 0x7f),
        F::Stop => RGBColor(0x2c, 0xa0, 0x2c),
        F::PowerFail => RGBColor(0x8c, 0x56, 0x4b),
        F::Corrupt => RGBColor(0xe3, 0x77, 0xc2),
        F::Wipe => RGBColor(0x94, 0x67, 0xbd),
        F::Pause => RGBColor(0xbc, 0xbd, 0x22),
        F::Partition => RGBColor(0x1f, 0x77, 0xb4),
        F::ClockSkew => RGBColor(0x17, 0xbe, 0xcf),
        _ => RGBColor(0xaa, 0xaa, 0xaa),
    }
}

/// Fault bands are this opaque (a legend swatch is [`SWATCH_OPACITY`]).
const BAND_OPACITY: f64 = 0.16;
const SWATCH_OPACITY: f64 = 0.3;

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

/// Translucent bands over the plot's height, one per fault period (at least 2 px wide; an
/// unended one reaches the end of the run). Drawn before the data, so they stay behind it.
fn draw_bands<Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'_, '_, Y>,
    periods: &[Window],
    axis: &TimeAxis,
) -> DrawResult {
    let y = chart.y_range();
    let (px, _) = chart.plotting_area().get_pixel_range();
    let min_width = axis.span_s * 2.0 / f64::from((px.end - px.start).max(1));
    let bands: Vec<Rectangle<(f64, f64)>> = periods
        .iter()
        .map(|w| {
            let p = &w.period;
            let (x0, x1) = (axis.s(p.start_ns), axis.s(p.end_ns.unwrap_or(axis.end_ns).max(p.start_ns)));
            let style = fault_color(&p.f).mix(BAND_OPACITY).filled();
            Rectangle::new([(x0, y.start), (x1.max(x0 + min_width), y.end)], style)
        })
        .collect();
    chart.draw_series(bands)?;
    Ok(())
}

/// On top of the data: the fault labels at the top of the plot, the frame around it, and the
/// legend to its right.
fn finish<Y: Ranged<ValueType = f64>>(
    root: &Root<'_>,
    chart: &Chart<'_, '_, Y>,
    periods: &[Window],
    axis: &TimeAxis,
    keys: Vec<(Key, String)>,
) -> DrawResult {
    let (px, py) = chart.plotting_area().get_pixel_range();
    let y_any = chart.y_range().start;
    // Each label on the first of four rows where it does not overlap the previous label (or
    // else on the row that frees up first), on a light backing so that data under it shows.
    let style = font(10.0).color(&INK);
    let mut row_end = [i32::MIN; 4];
    for w in periods {
        let label = fault_label(w);
        let (width, height) = root.estimate_text_size(&label, &style)?;
        let (width, height) = (width as i32, height as i32);
        let start = chart.backend_coord(&(axis.s(w.period.start_ns), y_any)).0 + 3;
        let x = start.min(px.end - width - 3).max(px.start + 3);
        let row = row_end
            .iter()
            .position(|e| *e < x)
            .unwrap_or_else(|| row_end.iter().enumerate().min_by_key(|(_, e)| **e).map_or(0, |(i, _)| i));
        if let Some(e) = row_end.get_mut(row) {
            *e = x + width + 4;
        }
        let y = py.start + 3 + (height + 3) * row as i32;
        root.draw(&Rectangle::new([(x - 2, y - 1), (x + width + 2, y + height + 1)], WHITE.mix(0.7).filled()))?;
        root.draw(&Text::new(label, (x, y), style.clone()))?;
    }
    root.draw(&Rectangle::new([(px.start, py.start), (px.end, py.end)], FRAME))?;

    // The legend, one entry a row. Not plotters' series labels: those are drawn inside the
    // plot area (coordinates are clamped to it), and this one lists fault kinds and marker
    // shapes as well as series.
    let style = font(12.0).color(&INK).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (key, label)) in keys.into_iter().enumerate() {
        let y = py.start + 8 + LEGEND_ROW * i as i32;
        root.draw(&key.element::<SVGBackend<'_>>((LEGEND_X, y)))?;
        root.draw(&Text::new(label, (LEGEND_X + 24, y), style.clone()))?;
    }
    Ok(())
}

/// The legend's row height (pixels).
const LEGEND_ROW: i32 = 18;

/// A plot with nothing to show: the axes, the fault bands, "no data", and the faults' legend.
fn no_data(name: &str, title: &str, why: &str, periods: &[Window], axis: &TimeAxis) -> String {
    render(name, |root| {
        let mut chart = frame(root, title, why, axis, 0.0..1.0, None)?;
        draw_bands(&mut chart, periods, axis)?;
        let (px, py) = chart.plotting_area().get_pixel_range();
        let center = ((px.start + px.end) / 2, (py.start + py.end) / 2);
        let style = font(20.0).color(&FRAME).pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new("no data", center, style))?;
        finish(root, &chart, periods, axis, fault_keys(periods))
    })
}

// ---------------------------------------------------------------------------------------------
// Markers and legend keys.

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

/// One marker of any [`Shape`], `r` pixels in radius, filled or (`hollow`) outlined; at a
/// data point in a series, or at a pixel in the legend. plotters' own markers are one type per
/// shape; this one element lets a series mix shapes and keep the order of its points.
#[derive(Debug, Clone, Copy)]
struct Marker<C> {
    at: C,
    shape: Shape,
    r: f64,
    color: RGBAColor,
    hollow: bool,
}

impl<'a, C: 'a> PointCollection<'a, C> for &'a Marker<C> {
    type Point = &'a C;
    type IntoIter = std::iter::Once<&'a C>;

    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<C, DB: DrawingBackend> Drawable<DB> for Marker<C> {
    fn draw<I: Iterator<Item = BackendCoord>>(
        &self,
        mut pos: I,
        backend: &mut DB,
        _parent: (u32, u32),
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        let Some((x, y)) = pos.next() else { return Ok(()) };
        let style = ShapeStyle { color: self.color, filled: !self.hollow, stroke_width: 1 };
        let r = self.r;
        let at = |dx: f64, dy: f64| (x + (dx * r).round() as i32, y + (dy * r).round() as i32);
        let outline = match self.shape {
            Shape::Circle => return backend.draw_circle((x, y), r.round() as u32, &style, !self.hollow),
            Shape::Square => return backend.draw_rect(at(-0.9, -0.9), at(0.9, 0.9), &style, !self.hollow),
            Shape::Triangle => vec![at(0.0, -1.3), at(1.2, 0.9), at(-1.2, 0.9)],
            Shape::TriangleDown => vec![at(0.0, 1.3), at(1.2, -0.9), at(-1.2, -0.9)],
            Shape::Diamond => vec![at(0.0, -1.3), at(1.3, 0.0), at(0.0, 1.3), at(-1.3, 0.0)],
        };
        if self.hollow {
            let close = outline.first().copied();
            backend.draw_path(outline.into_iter().chain(close), &style)
        } else {
            backend.fill_polygon(outline, &style)
        }
    }
}

/// A legend entry's symbol.
#[derive(Debug, Clone, Copy)]
enum Key {
    Marker { shape: Shape, color: RGBColor, hollow: bool },
    Line { color: RGBColor, dashed: bool, wide: bool },
    Swatch { color: RGBColor },
}

impl Key {
    /// The symbol, 18 pixels wide from `(x, y)` on, vertically centred on `y`.
    fn element<DB: DrawingBackend>(&self, (x, y): BackendCoord) -> DynElement<'static, DB, BackendCoord> {
        match *self {
            Key::Marker { shape, color, hollow } => {
                Marker { at: (x + 9, y), shape, r: 4.0, color: color.to_rgba(), hollow }.into_dyn()
            }
            Key::Line { color, dashed, wide } => {
                let ends = vec![(x, y), (x + 18, y)];
                if dashed {
                    DashedPathElement::new(ends, 5, 3, line_style(color, wide)).into_dyn()
                } else {
                    PathElement::new(ends, line_style(color, wide)).into_dyn()
                }
            }
            Key::Swatch { color } => {
                Rectangle::new([(x + 1, y - 5), (x + 17, y + 6)], color.mix(SWATCH_OPACITY).filled()).into_dyn()
            }
        }
    }
}

/// A throughput line: deliveries wide and light (they often track sends exactly and would hide
/// them), the others thin.
fn line_style(color: RGBColor, wide: bool) -> ShapeStyle {
    if wide {
        color.mix(0.45).stroke_width(4)
    } else {
        color.stroke_width(2)
    }
}

fn fault_keys(periods: &[Window]) -> Vec<(Key, String)> {
    let kinds: BTreeSet<F> = periods.iter().map(|w| w.period.f.clone()).collect();
    kinds.iter().map(|f| (Key::Swatch { color: fault_color(f) }, format!("fault: {}", f_name(f)))).collect()
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

impl Outcome {
    /// Drawing order: `ok` first (there are many), failures last (on top).
    const ORDER: [Outcome; 4] = [Outcome::Ok, Outcome::Unknown, Outcome::Info, Outcome::Fail];

    /// Color and opacity, radius, and whether hollow.
    fn paint(self) -> (RGBAColor, f64, bool) {
        match self {
            Outcome::Ok => (OK.mix(0.55), 2.0, false),
            Outcome::Unknown => (INFO.to_rgba(), 3.0, true),
            Outcome::Info => (INFO.mix(0.9), 3.0, false),
            Outcome::Fail => (FAIL.mix(0.9), 3.0, false),
        }
    }
}

struct Point {
    t_ns: u64,
    lat_ms: f64,
    shape: Shape,
}

/// The latency plot's points by outcome (all of them: thinning happens when drawing), their
/// range in ms, and the `f`s seen.
struct LatencyData {
    groups: Vec<(Outcome, Vec<Point>)>,
    lo_ms: f64,
    hi_ms: f64,
    fs: BTreeSet<F>,
}

fn latency_data(ops: &[ClientOp<'_>], end_ns: u64) -> LatencyData {
    let mut groups: Vec<(Outcome, Vec<Point>)> = Outcome::ORDER.iter().map(|o| (*o, Vec::new())).collect();
    let mut fs: BTreeSet<F> = BTreeSet::new();
    let (mut lo_ms, mut hi_ms) = (f64::INFINITY, 0f64);
    for o in ops {
        let outcome = match o.completion {
            Some((Type::Ok, _)) => Outcome::Ok,
            Some((Type::Fail, _)) => Outcome::Fail,
            Some((_, _)) => Outcome::Info,
            None => Outcome::Unknown,
        };
        let done = o.completion.map_or(end_ns, |(_, t)| t);
        let lat_ms = (done.saturating_sub(o.invoke_ns) as f64 / NS_PER_MS).max(1e-3);
        lo_ms = lo_ms.min(lat_ms);
        hi_ms = hi_ms.max(lat_ms);
        fs.insert(o.f.clone());
        if let Some((_, points)) = groups.iter_mut().find(|(g, _)| *g == outcome) {
            points.push(Point { t_ns: o.invoke_ns, lat_ms, shape: shape_of(&o.f) });
        }
    }
    LatencyData { groups, lo_ms, hi_ms, fs }
}

fn latency_svg(ops: &[ClientOp<'_>], periods: &[Window], axis: &TimeAxis) -> String {
    const TITLE: &str = "Client operation latency";
    const NAME: &str = "latency";
    if ops.is_empty() {
        return no_data(NAME, TITLE, "no client operations in the history", periods, axis);
    }
    let data = latency_data(ops, axis.end_ns);
    let count = |o: Outcome| data.groups.iter().find(|(g, _)| *g == o).map_or(0, |(_, p)| p.len());
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
    if data.fs.len() > 1 {
        for f in &data.fs {
            keys.push((Key::Marker { shape: shape_of(f), color: SHAPE_KEY, hollow: false }, f_name(f).to_string()));
        }
    }
    keys.extend(fault_keys(periods));

    render(NAME, |root| {
        let (lo_v, hi_v, bold, light) = log_ticks(data.lo_ms, data.hi_ms);
        let y = (value_125(lo_v)..value_125(hi_v)).log_scale().with_key_points(bold).with_light_points(light);
        let y_fmt = |v: &f64| fmt_ms_tick(*v);
        let mut chart = frame(root, TITLE, &subtitle, axis, y, Some(("latency (log scale)", &y_fmt)))?;
        draw_bands(&mut chart, periods, axis)?;
        for (outcome, points) in &data.groups {
            let (color, r, hollow) = outcome.paint();
            let step = if *outcome == Outcome::Ok { ok_step } else { other_step };
            chart.draw_series(points.iter().step_by(step).map(|p| Marker {
                at: (axis.s(p.t_ns), p.lat_ms),
                shape: p.shape,
                r,
                color,
                hollow,
            }))?;
        }
        finish(root, &chart, periods, axis, keys)
    })
}

fn line_color(f: &F) -> RGBColor {
    match f {
        F::Send => RGBColor(0x1f, 0x77, 0xb4),
        F::Deliver => RGBColor(0x94, 0x67, 0xbd),
        F::Read => RGBColor(0x2c, 0xa0, 0x2c),
        F::Resend => RGBColor(0xff, 0x7f, 0x0e),
        F::FinalRead => RGBColor(0x8c, 0x56, 0x4b),
        F::FinalSend => RGBColor(0x17, 0xbe, 0xcf),
        F::Subscribe => RGBColor(0xe3, 0x77, 0xc2),
        _ => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

/// Per-second buckets of client completions by completion time: `ok` ones per `f` (but not
/// `subscribe` or `caught-up`: subscription events, not throughput), and `fail` + `info` of
/// the timed operations.
fn throughput_buckets(history: &[Op], end_ns: u64) -> (BTreeMap<F, Vec<u64>>, Vec<u64>) {
    let n_buckets = (end_ns / 1_000_000_000 + 1) as usize;
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
    lines.remove(&F::Subscribe);
    lines.remove(&F::CaughtUp);
    (lines, errors)
}

/// The corners of a step line through per-second buckets, in (seconds, count).
fn step_points(buckets: &[u64], axis: &TimeAxis) -> Vec<(f64, f64)> {
    let mut points = Vec::with_capacity(buckets.len() * 2);
    for (i, &c) in buckets.iter().enumerate() {
        let t0 = (i as u64).saturating_mul(1_000_000_000);
        let t1 = t0.saturating_add(1_000_000_000).min(axis.end_ns.max(t0));
        points.push((axis.s(t0), c as f64));
        points.push((axis.s(t1), c as f64));
    }
    points
}

fn throughput_svg(history: &[Op], periods: &[Window], axis: &TimeAxis) -> String {
    const TITLE: &str = "Throughput: ok completions per second";
    const NAME: &str = "throughput";
    let (lines, errors) = throughput_buckets(history, axis.end_ns);
    if lines.is_empty() && errors.iter().all(|c| *c == 0) {
        return no_data(NAME, TITLE, "no client completions in the history", periods, axis);
    }
    let total: u64 = lines.values().flatten().sum();
    let n_errors: u64 = errors.iter().sum();
    let subtitle =
        format!("1-second buckets by completion time; {total} ok completions, {n_errors} fail/info (dashed)");
    let max = lines.values().chain(std::iter::once(&errors)).flatten().copied().max().unwrap_or(0);
    let mut keys: Vec<(Key, String)> = lines
        .keys()
        .map(|f| {
            (Key::Line { color: line_color(f), dashed: false, wide: *f == F::Deliver }, format!("{} ok", f_name(f)))
        })
        .collect();
    if n_errors > 0 {
        keys.push((Key::Line { color: FAIL, dashed: true, wide: false }, "fail + info".into()));
    }
    keys.extend(fault_keys(periods));

    render(NAME, |root| {
        let y_fmt = |v: &f64| fmt_tick(*v);
        let y = 0.0..linear_top(max as f64);
        let mut chart = frame(root, TITLE, &subtitle, axis, y, Some(("completions per second", &y_fmt)))?;
        draw_bands(&mut chart, periods, axis)?;
        // Deliveries first: wide and light, under the others.
        let mut ordered: Vec<(&F, &Vec<u64>)> = lines.iter().collect();
        ordered.sort_by_key(|(f, _)| **f != F::Deliver);
        for (f, buckets) in ordered {
            chart.draw_series(LineSeries::new(
                step_points(buckets, axis),
                line_style(line_color(f), *f == F::Deliver),
            ))?;
        }
        if n_errors > 0 {
            chart.draw_series(DashedLineSeries::new(step_points(&errors, axis), 5, 3, line_style(FAIL, false)))?;
        }
        finish(root, &chart, periods, axis, keys)
    })
}

fn unseen_svg(history: &[Op], ops: &[ClientOp<'_>], periods: &[Window], axis: &TimeAxis) -> String {
    const TITLE: &str = "Acked but unseen: ok sends not yet delivered to any subscriber";
    const NAME: &str = "unseen";
    let series = unseen_series(history, ops, axis.end_ns);
    if series.is_empty() {
        return no_data(NAME, TITLE, "no acknowledged sends in the history", periods, axis);
    }
    let (peak_t, peak) = series.iter().fold((0, 0), |best, &(t, n)| if n > best.1 { (t, n) } else { best });
    let at_end = series.last().map_or(0, |p| p.1);
    let step_ms = series.get(1).map_or(UNSEEN_STEP_NS, |p| p.0) / 1_000_000;
    let subtitle = format!(
        "sampled every {step_ms} ms; peak {peak} at {:.1} s; {at_end} still undelivered at the end",
        peak_t as f64 / NS_PER_S
    );
    let mut keys = vec![(Key::Line { color: UNSEEN, dashed: false, wide: false }, "acked, unseen".to_string())];
    keys.extend(fault_keys(periods));

    render(NAME, |root| {
        let y_fmt = |v: &f64| fmt_tick(*v);
        let y = 0.0..linear_top(peak as f64);
        let mut chart = frame(root, TITLE, &subtitle, axis, y, Some(("acked, not yet delivered", &y_fmt)))?;
        draw_bands(&mut chart, periods, axis)?;
        let curve = series.iter().map(|&(t, n)| (axis.s(t), n as f64));
        chart.draw_series(AreaSeries::new(curve, 0.0, UNSEEN.mix(0.2)).border_style(line_style(UNSEEN, false)))?;
        finish(root, &chart, periods, axis, keys)
    })
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
        assert!(doc.starts_with("<svg ") && doc.contains(r#"xmlns="http://www.w3.org/2000/svg""#), "{name}");
        // Text is SVG text, for the viewer's own sans-serif font: nothing rasterised, no font file.
        assert!(!doc.contains("<image"), "{name}");
        assert!(count(doc, "text", &[]) > 0 && count(doc, "text", &[]) == count(doc, "text", &[SANS]), "{name}");
    }

    const SANS: &str = r#"font-family="sans-serif""#;

    fn all(p: &Plots) -> [(&'static str, &str); 3] {
        [("latency", &p.latency_svg), ("throughput", &p.throughput_svg), ("unseen", &p.unseen_svg)]
    }

    /// The attribute text of every `<tag …>` element, in document order.
    fn elements<'d>(doc: &'d str, tag: &str) -> Vec<&'d str> {
        let open = format!("<{tag} ");
        doc.match_indices(&open)
            .filter_map(|(i, _)| doc.get(i + open.len()..).and_then(|rest| rest.find('>').map(|j| &rest[..j])))
            .collect()
    }

    /// How many `<tag …>` elements carry every one of `attrs` (each `name="value"`).
    fn count(doc: &str, tag: &str, attrs: &[&str]) -> usize {
        elements(doc, tag)
            .iter()
            .filter(|e| attrs.iter().all(|a| e.contains(&format!(" {a}")) || e.starts_with(a)))
            .count()
    }

    /// A numeric attribute of an element's attribute text.
    fn attr(element: &str, name: &str) -> f64 {
        let key = format!(" {name}=\"");
        let at = element
            .find(&key)
            .map(|i| i + key.len())
            .or_else(|| element.starts_with(&key[1..]).then_some(key.len() - 1));
        let rest = &element[at.unwrap_or_else(|| panic!("no {name} in {element}"))..];
        rest[..rest.find('"').expect("a closing quote")].parse().expect("a number")
    }

    /// The content of every `<text>` element, trimmed and unescaped.
    fn texts(doc: &str) -> Vec<String> {
        doc.split("<text ")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..t.find("</text>")?];
                let body = body.trim();
                Some(
                    body.replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&quot;", "\"")
                        .replace("&apos;", "'")
                        .replace("&amp;", "&"),
                )
            })
            .collect()
    }

    fn has_text(doc: &str, text: &str) -> bool {
        texts(doc).iter().any(|t| t == text)
    }

    /// `fill="#RRGGBB"` as the SVG backend writes it; and the same for `stroke`.
    fn fill(c: RGBColor) -> String {
        format!(r##"fill="#{:02X}{:02X}{:02X}""##, c.0, c.1, c.2)
    }

    fn stroke(c: RGBColor) -> String {
        format!(r##"stroke="#{:02X}{:02X}{:02X}""##, c.0, c.1, c.2)
    }

    /// Markers of one outcome drawn as data (legend keys are opaque, data markers are not).
    fn markers(doc: &str, outcome: Outcome) -> usize {
        let (color, r, hollow) = outcome.paint();
        let rgb = RGBColor(color.0, color.1, color.2);
        let opacity = format!(r#"opacity="{}""#, color.3);
        let radius = format!(r#"r="{}""#, r.round());
        if hollow {
            let s = stroke(rgb);
            count(doc, "circle", &[&s, &opacity, &radius, r#"fill="none""#]) + count(doc, "polyline", &[&s, &opacity])
        } else {
            let f = fill(rgb);
            count(doc, "circle", &[&f, &opacity, &radius])
                + count(doc, "polygon", &[&f, &opacity])
                + count(doc, "rect", &[&f, &opacity])
        }
    }

    fn bands(doc: &str) -> Vec<&str> {
        let opacity = format!(r#"opacity="{BAND_OPACITY}""#);
        elements(doc, "rect").into_iter().filter(|e| e.contains(&opacity)).collect()
    }

    /// The plot's frame: `(left, top, right, bottom)`.
    fn frame_of(doc: &str) -> (f64, f64, f64, f64) {
        let s = stroke(FRAME);
        let frames: Vec<&str> =
            elements(doc, "rect").into_iter().filter(|e| e.contains(&s) && e.contains(r#"fill="none""#)).collect();
        assert_eq!(frames.len(), 1, "{frames:?}");
        let f = frames[0];
        (attr(f, "x"), attr(f, "y"), attr(f, "x") + attr(f, "width"), attr(f, "y") + attr(f, "height"))
    }

    #[test]
    fn the_checker_rejects_malformed_documents() {
        assert!(well_formed("<svg><g></g><rect/></svg>").is_ok());
        assert!(well_formed("<svg><g></svg></g>").is_err());
        assert!(well_formed("<svg><g></svg>").is_err());
        assert!(well_formed("<svg>a & b</svg>").is_err());
        assert!(well_formed("<svg>a &amp; b</svg><svg/>").is_err());
        assert!(well_formed(r#"<svg x="a>b"></svg>"#).is_ok());
        let doc = r##"<svg a="1"><rect x="2" y="3" width="4" height="5" fill="#00FF00"/><text x="1" fill="#000000">
a &amp; b
</text></svg>"##;
        assert_eq!(texts(doc), vec!["a & b".to_string()]);
        assert_eq!(count(doc, "rect", &[r##"fill="#00FF00""##]), 1);
        assert_eq!(count(doc, "rect", &[r##"fill="#00FF01""##]), 0);
        assert_eq!(count(doc, "text", &[r#"x="1""#]), 1);
        assert_eq!(attr(elements(doc, "rect")[0], "x") + attr(elements(doc, "rect")[0], "width"), 6.0);
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
        assert_eq!(fmt_ms_tick(1000.0), "1 s");
        assert_eq!(fmt_ms_tick(0.2), "0.2 ms");
        assert_eq!(fmt_ms_tick(50.000_000_1), "50 ms");
        // Two decades: every 1-2-5 value labelled; a little more, and 2s and 5s are not.
        assert_eq!(log_ticks(1.0, 40.0), ((5, -1), (5, 1), vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0], vec![]));
        assert_eq!(log_ticks(1.0, 80.0), ((5, -1), (1, 2), vec![0.5, 1.0, 10.0, 100.0], vec![2.0, 5.0, 20.0, 50.0]));
        // Four decades: decades and ends labelled, the rest unlabelled grid lines.
        let (lo, hi, bold, light) = log_ticks(2.0, 8_000.0);
        assert_eq!((lo, hi, bold.len(), light.len()), ((1, 0), (1, 4), 5, 8));
        // More: only the labelled ones.
        let (_, _, bold, light) = log_ticks(0.01, 60_000.0);
        assert_eq!((bold.len(), light.len()), (9, 0));
        assert_eq!(fmt_tick(20.0), "20");
        assert_eq!(fmt_tick(0.5), "0.5");
        assert_eq!(fmt_tick(0.0002), "0.0002");
        assert_eq!(fmt_tick(0.30000000000000004), "0.3");
        assert_eq!(fmt_tick(100.0), "100");
        assert_eq!(linear_top(0.0), 1.0);
        assert_eq!(linear_top(54.0), 60.0);
        assert_eq!(linear_top(291.0), 300.0);
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
            assert_well_formed(name, doc);
            assert!(has_text(doc, "partition n1,n3 (bridge)"), "{name}: {:?}", texts(doc));
        }
        // Text is escaped by the SVG backend.
        let mut b = Builder::default();
        b.op(0.0, Type::Invoke, Process::NEMESIS, F::Pause, json!({"variant": "a<b & 'c'", "nodes": [2]}));
        b.send(1, "a", 0.0, 3.0, Type::Ok).deliver("a", 4.0);
        let p = plots(&b.build());
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert!(has_text(doc, "pause n2 (a<b & 'c')"), "{name}: {:?}", texts(doc));
        }
    }

    #[test]
    fn plots_are_well_formed_and_shade_every_fault() {
        let h = small_history();
        let p = plots(&h);
        let kill = fill(fault_color(&F::Kill));
        let partition = fill(fault_color(&F::Partition));
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            let bands = bands(doc);
            assert_eq!(bands.len(), 2, "{name}");
            assert!(bands[0].contains(&kill) && bands[1].contains(&partition), "{name}: {bands:?}");
            assert!(has_text(doc, "kill n1") && has_text(doc, "partition n3"), "{name}: {:?}", texts(doc));
            assert!(has_text(doc, "fault: kill") && has_text(doc, "fault: partition"), "{name}");
            assert!(has_text(doc, "time since start (s)"), "{name}");
            assert!(!has_text(doc, "no data"), "{name}");
            // The kill band spans 2–3.5 s of the 9.9 s run: it sits where the time axis says.
            let (left, _, right, _) = frame_of(doc);
            let at = |t_s: f64| left + (right - left) * t_s / (run_end(&h) as f64 / NS_PER_S);
            let (x, w) = (attr(bands[0], "x"), attr(bands[0], "width"));
            assert!((x - at(2.0)).abs() <= 1.5 && (x + w - at(3.5)).abs() <= 1.5, "{name}: {x} {w} vs {}", at(2.0));
            // The legend is right of the plot.
            let legend_x = elements(doc, "text")
                .into_iter()
                .zip(texts(doc))
                .find(|(_, t)| t == "fault: kill")
                .map(|(e, _)| attr(e, "x"))
                .expect("a legend entry");
            assert!(legend_x > right, "{name}: {legend_x} <= {right}");
        }
        // 300 sends + 2 reads; 10 failed sends, 1 info read.
        assert_eq!(markers(&p.latency_svg, Outcome::Ok), 291);
        assert_eq!(markers(&p.latency_svg, Outcome::Fail), 10);
        assert_eq!(markers(&p.latency_svg, Outcome::Info), 1);
        assert_eq!(markers(&p.latency_svg, Outcome::Unknown), 0);
        assert!(has_text(&p.latency_svg, "302 operations: 291 ok, 10 fail, 1 info"), "{:?}", texts(&p.latency_svg));
        for key in ["ok: 291", "fail: 10", "info: 1", "send", "read", "latency (log scale)"] {
            assert!(has_text(&p.latency_svg, key), "{key}: {:?}", texts(&p.latency_svg));
        }
        // Reads are triangles (polygons), sends circles.
        let ok = (fill(OK), r#"opacity="0.55""#);
        assert_eq!(count(&p.latency_svg, "polygon", &[&ok.0, ok.1]), 1);
        assert_eq!(count(&p.latency_svg, "circle", &[&ok.0, ok.1]), 290);

        // Throughput: one polyline per f, and its legend key; the dashed errors are many dashes.
        let t = &p.throughput_svg;
        assert_eq!(count(t, "polyline", &[&stroke(line_color(&F::Send)), r#"stroke-width="2""#]), 2);
        assert_eq!(count(t, "polyline", &[&stroke(line_color(&F::Deliver)), r#"stroke-width="4""#]), 2);
        assert!(count(t, "polyline", &[&stroke(FAIL)]) > 10);
        for key in ["send ok", "deliver ok", "read ok", "fail + info", "completions per second"] {
            assert!(has_text(t, key), "{key}: {:?}", texts(t));
        }
        assert!(has_text(t, "1-second buckets by completion time; 581 ok completions, 11 fail/info (dashed)"));
        let (lines, errors) = throughput_buckets(&h, run_end(&h));
        assert_eq!(lines.get(&F::Send).map(|b| b.iter().sum::<u64>()), Some(290));
        assert_eq!(lines.get(&F::Send).and_then(|b| b.get(1)).copied(), Some(30));
        assert_eq!(errors.iter().sum::<u64>(), 11);

        // Unseen: an area and its border.
        let u = &p.unseen_svg;
        assert_eq!(count(u, "polygon", &[&fill(UNSEEN), r#"opacity="0.2""#]), 1);
        assert!(has_text(u, "acked, unseen") && has_text(u, "acked, not yet delivered"));

        // The three share one layout, so they line up when stacked.
        assert_eq!(frame_of(&p.latency_svg), frame_of(t));
        assert_eq!(frame_of(t), frame_of(u));

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
            let bands = bands(doc);
            assert_eq!(bands.len(), 3, "{name}");
            let (_, _, right, _) = frame_of(doc);
            let pause = bands[2];
            assert!((attr(pause, "x") + attr(pause, "width") - right).abs() <= 1.0, "{name}: {pause} vs {right}");
            assert!(has_text(doc, "pause n2"), "{name}");
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
        let u = plots(&h).unseen_svg;
        assert!(
            has_text(&u, "sampled every 200 ms; peak 60 at 6.0 s; 0 still undelivered at the end"),
            "{:?}",
            texts(&u)
        );

        // A send that is never delivered stays unseen at the end.
        let mut b = Builder::default();
        b.send(1, "lost", 0.0, 10.0, Type::Ok).send(1, "seen", 20.0, 30.0, Type::Ok).deliver("seen", 35.0);
        b.send(2, "failed", 0.0, 10.0, Type::Fail).op(1000.0, Type::Ok, Process::Client(9), F::Subscribe, json!({}));
        let h = b.build();
        let series = unseen_series(&h, &client_ops(&h), run_end(&h));
        assert_eq!(series.last(), Some(&(1_000_000_000, 1)));
        let u = plots(&h).unseen_svg;
        assert!(texts(&u).iter().any(|t| t.ends_with("1 still undelivered at the end")), "{:?}", texts(&u));
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
        let shown_ok = markers(&p.latency_svg, Outcome::Ok);
        assert!((MAX_POINTS / 2..=MAX_POINTS).contains(&shown_ok), "{shown_ok}");
        assert_eq!(shown_ok, 16_334);
        assert_eq!(markers(&p.latency_svg, Outcome::Fail), 1_000);
        assert!(texts(&p.latency_svg)
            .iter()
            .any(|t| t.ends_with("1 in 3 ok points shown (16334 of 49000), all others")));
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
            assert!(has_text(doc, "no data"), "{name}");
            assert!(bands(doc).is_empty(), "{name}");
        }
        assert!(has_text(&p.latency_svg, "no client operations in the history"));
        assert!(has_text(&p.throughput_svg, "no client completions in the history"));
        assert!(has_text(&p.unseen_svg, "no acknowledged sends in the history"));
        assert!(fault_periods(&[]).is_empty());
        let summary = summary_text(&[], &Value::Null);
        assert!(summary.contains("faults: none") && summary.contains("checker: unknown"), "{summary}");

        let mut b = Builder::default();
        b.send(1, "a", 0.0, 3.0, Type::Ok);
        let p = plots(&b.build());
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert!(bands(doc).is_empty() && !has_text(doc, "no data"), "{name}");
        }
        assert_eq!(markers(&p.latency_svg, Outcome::Ok), 1);

        // Only nemesis ops: bands, but no data.
        let mut b = Builder::default();
        b.nemesis(F::Partition, 0.0, 1.0, &[2]);
        let p = plots(&b.build());
        for (name, doc) in all(&p) {
            assert_well_formed(name, doc);
            assert!(has_text(doc, "no data") && bands(doc).len() == 1, "{name}");
            assert!(has_text(doc, "partition n2") && has_text(doc, "fault: partition"), "{name}");
        }
    }

    #[test]
    fn operations_that_never_complete_are_plotted_hollow() {
        let mut b = Builder::default();
        b.send(1, "a", 0.0, 3.0, Type::Ok);
        b.op(1.0, Type::Invoke, Process::Client(2), F::Send, json!({"text": "b"}));
        b.op(2000.0, Type::Ok, Process::Client(3), F::Deliver, json!({"text": "a"}));
        let h = b.build();
        let p = plots(&h);
        assert_eq!(markers(&p.latency_svg, Outcome::Unknown), 1);
        assert_eq!(markers(&p.latency_svg, Outcome::Ok), 1);
        assert!(has_text(&p.latency_svg, "never completed: 1"));
        assert!(texts(&p.latency_svg).iter().any(|t| t.contains("1 never completed (plotted at run end)")));
        // Plotted at the run's end: invoked at 1 ms, latency 1999 ms.
        let data = latency_data(&client_ops(&h), run_end(&h));
        let unknown =
            data.groups.iter().find(|(o, _)| *o == Outcome::Unknown).map(|(_, p)| p.as_slice()).unwrap_or(&[]);
        assert_eq!(unknown.len(), 1);
        assert!((unknown[0].lat_ms - 1_999.0).abs() < 1e-9 && unknown[0].t_ns == 1_000_000);
    }

    #[test]
    fn markers_take_their_shape_from_f() {
        let mut b = Builder::default();
        b.send(1, "a", 0.0, 3.0, Type::Ok);
        b.client(2, F::Resend, 10.0, 12.0, Type::Ok, json!({"text": "a"}));
        b.client(3, F::Read, 20.0, 25.0, Type::Ok, json!({}));
        b.client(4, F::FinalRead, 30.0, 35.0, Type::Ok, json!({}));
        b.client(5, F::FinalSend, 40.0, 45.0, Type::Fail, json!({"text": "z"}));
        let doc = plots(&b.build()).latency_svg;
        let ok = (fill(OK), r#"opacity="0.55""#);
        assert_eq!(count(&doc, "circle", &[&ok.0, ok.1]), 1, "send");
        assert_eq!(count(&doc, "rect", &[&ok.0, ok.1]), 1, "resend");
        let polygons: Vec<usize> = elements(&doc, "polygon")
            .into_iter()
            .filter(|e| e.contains(&ok.0) && e.contains(ok.1))
            .map(|e| {
                e.split("points=\"")
                    .nth(1)
                    .and_then(|p| p.split('"').next())
                    .map_or(0, |p| p.split_whitespace().count())
            })
            .collect();
        assert_eq!(polygons, vec![3, 4], "read is a triangle, final-read a diamond");
        assert_eq!(count(&doc, "polygon", &[&fill(FAIL), r#"opacity="0.9""#]), 1, "final-send");
        for key in ["send", "resend", "read", "final-read", "final-send"] {
            assert!(has_text(&doc, key), "{key}");
        }
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

    #[test]
    fn an_undecided_summary_says_why() {
        let h = small_history();
        let long = "x".repeat(1000);
        let notes = json!(["node 3 was not read at the end", long, "third", "fourth"]);
        let s = summary_text(&h, &json!({"valid": "unknown", "anomaly_counts": {}, "notes": notes}));
        assert!(s.contains("checker: unknown; no anomalies\n  note: node 3 was not read at the end\n"), "{s}");
        assert!(s.contains(&format!("  note: {} …\n  note: third\n", &long[..SUMMARY_NOTE_CHARS])), "{s}");
        assert!(!s.contains("fourth"), "{s}");
        let s = summary_text(&h, &json!({"valid": "valid", "anomaly_counts": {}, "notes": ["a note"]}));
        assert!(!s.contains("note:"), "{s}");
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
            let bands = bands(doc);
            assert_eq!(bands.len(), 3, "{name}");
            // The final heal ended the pause before the run's end.
            let (_, _, right, _) = frame_of(doc);
            assert!(bands.iter().all(|b| attr(b, "x") + attr(b, "width") < right - 2.0), "{name}");
            for label in ["kill n1 (leader)", "partition n1,n2,n3 (isolate-one)", "pause n2 (one)"] {
                assert!(has_text(doc, label), "{name}: {label}");
            }
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
