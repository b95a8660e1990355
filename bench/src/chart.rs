//! One chart of a benchmark's records, drawn with plotters' SVG backend: msgs/s (top) and
//! p99 latency (bottom) per workload, with every system's bar side by side.
//!
//! Both panels use a log scale: the workloads span three orders of magnitude (a lone sender
//! against a catch-up read). A record goes in when its system measured the workload; a
//! missing bar means the system was not measured there, never zero. Text is plain SVG
//! `<text>`: plotters' SVG backend without its font features measures text by estimate and
//! reads no font file, so charts draw the same on a machine without fonts.

use std::collections::BTreeSet;

use plotters::prelude::*;
use serde_json::Value;

/// Pixels of the whole chart.
const WIDTH: u32 = 1100;
/// Pixels of each of the two panels.
const PANEL_HEIGHT: u32 = 330;
/// Space left for the x labels under the lower panel, in pixels.
const LABEL_AREA: u32 = 40;

/// One bar's worth of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub system: String,
    /// Workload and shape as drawn, e.g. `256×64` or `push 500/s`.
    pub label: String,
    pub msgs_per_s: f64,
    pub p99_ms: f64,
}

/// The short label of a record's workload, unique per workload and shape: a chart has room
/// for about ten characters under each group.
fn label(r: &Value) -> Option<String> {
    let workload = r.get("workload")?.as_str()?;
    let number = |key: &str| r.get(key).and_then(Value::as_f64);
    Some(match workload {
        "send_latency" => "1 sender".to_string(),
        "send_throughput" => format!("{:.0}×{:.0}", number("senders")?, number("conversations")?),
        "push_latency" => format!("push {:.0}/s", number("target_rate").or_else(|| number("msgs_per_s"))?),
        "connections" => format!("{:.0}k idle", number("connections").unwrap_or(0.0) / 1000.0),
        other => other.to_string(),
    })
}

/// A tick value in short form: 1.5k, 20k, 1M; 0.5, 2, 100.
fn short(v: f64) -> String {
    let (scaled, unit) = match v {
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    let text = format!("{scaled:.1}");
    format!("{}{unit}", text.trim_end_matches('0').trim_end_matches('.'))
}

/// The bars of `records` (bench JSON records of any system). Probes of the disk
/// (`disk_fsync`, `raw_append`) and records without a rate are left out.
pub fn bars(records: &[Value]) -> Vec<Bar> {
    records
        .iter()
        .filter_map(|r| {
            let system = r.get("system")?.as_str()?.to_string();
            if system == "disk" || matches!(r.get("workload")?.as_str()?, "disk_fsync" | "raw_append") {
                return None;
            }
            let msgs_per_s = r.get("msgs_per_s")?.as_f64()?;
            let p99_ms = r.get("p99_us").and_then(Value::as_f64).unwrap_or(0.0) / 1000.0;
            let label = label(r)?;
            (msgs_per_s > 0.0).then_some(Bar { system, label, msgs_per_s, p99_ms })
        })
        .collect()
}

/// A colour per system, stable across charts.
fn color(system: &str) -> RGBColor {
    match system {
        "convoy" => RGBColor(31, 119, 180),
        "jetstream" => RGBColor(255, 127, 14),
        "etcd" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Draws `bars` as a standalone SVG document; `title` heads it.
pub fn svg(bars: &[Bar], title: &str) -> Result<String, String> {
    let mut out = String::new();
    {
        let height = PANEL_HEIGHT * 2 + LABEL_AREA + 40;
        let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        let drawn = draw(&root, bars, title).and_then(|()| root.present());
        drawn.map_err(|e| format!("drawing the bench chart: {e:?}"))?;
    }
    Ok(out)
}

fn draw(root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, bars: &[Bar], title: &str) -> DrawResult {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (top, bottom) = root.split_vertically(PANEL_HEIGHT);
    let mut labels: Vec<String> = Vec::new();
    for b in bars {
        if !labels.contains(&b.label) {
            labels.push(b.label.clone());
        }
    }
    let systems: Vec<String> = bars.iter().map(|b| b.system.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    panel(&top, bars, &labels, &systems, "msgs/s (log)", |b| b.msgs_per_s, false)?;
    panel(&bottom, bars, &labels, &systems, "p99 latency, ms (log)", |b| b.p99_ms, true)
}

/// One panel: a bar per (workload, system), grouped by workload, on a log y axis.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    bars: &[Bar],
    labels: &[String],
    systems: &[String],
    y_desc: &str,
    value: impl Fn(&Bar) -> f64,
    x_labels: bool,
) -> DrawResult {
    let values: Vec<f64> = bars.iter().map(&value).filter(|v| *v > 0.0).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if values.is_empty() { (1.0, 10.0) } else { (lo / 2.0, hi * 2.0) };
    let groups = labels.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(if x_labels { LABEL_AREA } else { 10 })
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups, (lo..hi).log_scale())?;
    let label_at = |x: &f64| {
        let i = x.floor() as usize;
        let centred = (x - x.floor() - 0.5).abs() < 1e-6;
        if centred && x_labels {
            labels.get(i).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&label_at)
        .x_label_style(("sans-serif", 11))
        .y_label_formatter(&|v: &f64| short(*v))
        .y_desc(y_desc)
        .draw()?;
    let width = 0.8 / systems.len().max(1) as f64;
    for (k, system) in systems.iter().enumerate() {
        let rects = bars.iter().filter(|b| &b.system == system && value(b) > 0.0).filter_map(|b| {
            let group = labels.iter().position(|l| *l == b.label)? as f64;
            let x0 = group + 0.1 + width * k as f64;
            Some(Rectangle::new([(x0, lo), (x0 + width * 0.9, value(b))], color(system).filled()))
        });
        chart
            .draw_series(rects)?
            .label(system.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color(system).filled()));
    }
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn records() -> Vec<Value> {
        vec![
            json!({"system":"disk","workload":"disk_fsync","senders":1,"conversations":0,"msgs_per_s":3600.0,"p99_us":900}),
            json!({"system":"convoy","workload":"send_latency","senders":1,"conversations":1,"msgs_per_s":880.0,"p99_us":1990}),
            json!({"system":"convoy","workload":"send_throughput","senders":256,"conversations":64,"msgs_per_s":11300.0,"p99_us":40000}),
            json!({"system":"jetstream","workload":"send_throughput","senders":256,"conversations":64,"msgs_per_s":30300.0,"p99_us":15000}),
            json!({"system":"etcd","workload":"send_throughput","senders":256,"conversations":64,"msgs_per_s":9800.0,"p99_us":52000}),
            json!({"system":"etcd","workload":"connections","senders":0,"conversations":0,"msgs_per_s":0.0,"p99_us":0}),
            json!({"system":"convoy","workload":"push_latency","senders":1,"conversations":1,"msgs_per_s":499.7,"target_rate":500,"p99_us":5895}),
            json!({"system":"convoy","workload":"push_latency","senders":1,"conversations":1,"msgs_per_s":4990.0,"target_rate":5000,"p99_us":15783}),
        ]
    }

    #[test]
    fn bars_keep_measured_workloads_and_label_their_shapes() {
        let bars = bars(&records());
        let labels: Vec<(&str, &str)> = bars.iter().map(|b| (b.system.as_str(), b.label.as_str())).collect();
        assert_eq!(
            labels,
            [
                ("convoy", "1 sender"),
                ("convoy", "256×64"),
                ("jetstream", "256×64"),
                ("etcd", "256×64"),
                ("convoy", "push 500/s"),
                ("convoy", "push 5000/s"),
            ]
        );
        assert!((bars[0].p99_ms - 1.99).abs() < 1e-9);
    }

    #[test]
    fn the_chart_is_an_svg_with_a_bar_and_a_legend_entry_per_system() {
        let doc = svg(&bars(&records()), "convoy beside its peers").expect("drawn");
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"), "{}", &doc[..doc.len().min(200)]);
        for text in
            ["convoy beside its peers", "convoy", "jetstream", "etcd", "msgs/s (log)", "1 sender", "push 5000/s"]
        {
            assert!(doc.contains(text), "{text} missing");
        }
        // Two panels × (convoy 4 + jetstream 1 + etcd 1) bars, three filled legend swatches
        // per panel, and the backgrounds.
        let filled = doc.matches("<rect").count();
        assert!(filled >= 2 * 6 + 2 * 3, "{filled} rects");
    }

    #[test]
    fn an_empty_run_still_draws() {
        let doc = svg(&[], "nothing measured").expect("drawn");
        assert!(doc.contains("nothing measured"));
    }

    #[test]
    fn ticks_read_as_people_write_them() {
        let ticks = [0.5, 2.0, 1000.0, 1500.0, 20_000.0, 1e6].map(short);
        assert_eq!(ticks, ["0.5", "2", "1k", "1.5k", "20k", "1M"]);
    }
}
