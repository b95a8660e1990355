//! `convoy-bench`: throughput and latency of a fresh local three-node convoy cluster (see the
//! `convoy_bench` library for the workloads). Prints one table, the send path's stages and
//! the disk witness; writes the records as JSON with `--out`. The nodes run the `convoy`
//! binary beside this one (or `$CONVOY_BIN`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use convoy_bench::{
    cost_lines, read_records, run, stage_lines, table, witness_lines, write_chart, write_records, BenchOptions,
    RunArgs, WITNESS_HEADING,
};

/// The same allocator as the nodes' (src/bin/convoy.rs): the bench's client side, and the
/// `raw_append` workload's in-process RocksDB, measured under jemalloc before the bench left
/// the `convoy` binary, and the published figures assume it.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "convoy-bench",
    version,
    about = "Measure throughput and latency on a fresh local three-node convoy cluster"
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// Working directory for the bench's cluster and probes (its disk is what is measured).
    #[arg(long, default_value = "data/bench")]
    dir: PathBuf,
    /// Shards of the convoy cluster (default: 8, as cluster.toml's).
    #[arg(long)]
    shards: Option<u32>,
    /// Run only these workloads (comma-separated names, e.g. `send_throughput,connections`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run nothing: draw the chart of an earlier record file again (beside it, with
    /// `--compare`'s records), e.g. after the chart's code changed.
    #[arg(long, conflicts_with_all = ["quick", "out", "only"])]
    redraw: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bench(cli: Cli) -> Result<()> {
    if let Some(path) = &cli.redraw {
        let chart = write_chart(path, read_records(path)?, &cli.run.compare)?;
        println!("chart written to {}", chart.display());
        return Ok(());
    }
    let dir = std::path::absolute(&cli.dir)?;
    eprintln!("convoy-bench: fresh cluster under {}{}", dir.display(), if cli.run.quick { " (quick)" } else { "" });
    if let Some(n) = cli.shards {
        eprintln!("convoy-bench: {n} shards");
    }
    let opts = BenchOptions { quick: cli.run.quick, shards: cli.shards };
    let records = run(&dir, opts, &cli.only, |r| {
        eprintln!(
            "  {} senders={} convs={}: {:.0} msgs/s p50 {} µs p99 {} µs",
            r.workload, r.senders, r.conversations, r.msgs_per_s, r.p50_us, r.p99_us
        );
    })
    .await?;
    print!("{}", table(&records));
    let stages = stage_lines(&records);
    if !stages.is_empty() {
        print!("where a send's time went (all nodes; see `cluster status`):\n{stages}");
    }
    let costs = cost_lines(&records);
    if !costs.is_empty() {
        print!("what each message cost (nodes' CPU from /proc over the phase; the load generator apart):\n{costs}");
    }
    let witness = witness_lines(&records);
    if !witness.is_empty() {
        print!("{WITNESS_HEADING}\n{witness}");
    }
    if let Some(path) = cli.run.out {
        let chart =
            write_records(&path, &records, &cli.run.compare).with_context(|| format!("writing {}", path.display()))?;
        println!("records written to {}, chart to {}", path.display(), chart.display());
    }
    Ok(())
}
