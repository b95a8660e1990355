//! `convoy-jepsen`: run a fault-injection test against real convoy nodes, or re-check a
//! recorded history. Exit codes: 0 every check held, 1 an anomaly was found, 2 the run could
//! not decide (it could not run, or nothing could be checked).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use convoy_jepsen::checker::{self, Validity};
use convoy_jepsen::nemesis::{ALL_FAULTS, ALONE_FAULTS};
use convoy_jepsen::run::{self, RunOptions};

#[derive(Parser)]
#[command(name = "convoy-jepsen", about = "Fault injection for convoy, in the spirit of Jepsen")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a test in a private network and pid namespace.
    Run {
        /// Comma-separated fault families: kill,pause,partition,clock,power,corrupt (or "none").
        #[arg(long, default_value = "kill,pause,partition,clock,power")]
        faults: String,
        #[arg(long, default_value_t = 60)]
        time_limit: u64,
        /// Total send rate, operations per second.
        #[arg(long, default_value_t = 40.0)]
        rate: f64,
        #[arg(long)]
        seed: Option<u64>,
        /// Run a deliberately broken server (needs a binary built with `--features planted-bugs`).
        #[arg(long)]
        planted_bug: Option<String>,
        /// Where the history, data and report go (default: a new directory under /tmp).
        #[arg(long)]
        store: Option<PathBuf>,
        /// The convoy binary to test.
        #[arg(long)]
        convoy_bin: PathBuf,
        #[arg(long, default_value_t = 5)]
        conversations: usize,
        #[arg(long, default_value_t = 6)]
        senders: usize,
        #[arg(long, default_value_t = 6)]
        subscribers: usize,
        /// Keep this many messages per conversation: the leaders trim the rest during the
        /// run, and the checker knows that offsets below a node's earliest are gone on purpose.
        #[arg(long)]
        retention: Option<u64>,
    },
    /// Re-check a recorded history (JSON lines) and print the result.
    Check { history: PathBuf },
}

const INSIDE: &str = "CONVOY_JEPSEN_INSIDE_NAMESPACE";

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONVOY_LOG").unwrap_or_else(|_| "warn,fuser=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match cli.cmd {
        Cmd::Check { history } => check(&history),
        Cmd::Run {
            faults,
            time_limit,
            rate,
            seed,
            planted_bug,
            store,
            convoy_bin,
            conversations,
            senders,
            subscribers,
            retention,
        } => {
            if std::env::var_os(INSIDE).is_none() {
                // Re-run ourselves in a private network, pid and mount namespace: faults can
                // touch nothing outside the test, and every process dies with it.
                let exe = std::env::current_exe().expect("the path of this executable");
                let err = std::process::Command::new("unshare")
                    .args(["--net", "--pid", "--mount", "--fork", "--mount-proc", "--"])
                    .arg(exe)
                    .args(std::env::args_os().skip(1))
                    .env(INSIDE, "1")
                    .exec();
                eprintln!("cannot enter a private namespace with unshare: {err}");
                std::process::exit(2);
            }
            let faults: Vec<String> = if faults == "none" {
                Vec::new()
            } else {
                faults.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            };
            let known = |f: &String| ALL_FAULTS.contains(&f.as_str()) || ALONE_FAULTS.contains(&f.as_str());
            if let Some(bad) = faults.iter().find(|f| !known(f)) {
                eprintln!("unknown fault {bad:?}; known: {},{}", ALL_FAULTS.join(","), ALONE_FAULTS.join(","));
                std::process::exit(2);
            }
            if faults.len() > 1 && faults.iter().any(|f| ALONE_FAULTS.contains(&f.as_str())) {
                eprintln!("{} run only on their own", ALONE_FAULTS.join(","));
                std::process::exit(2);
            }
            let seed = seed.unwrap_or_else(|| u64::from(rand::random::<u16>()));
            // Not the pid: under `unshare --pid` the runner is always pid 1, and a second run
            // with the same seed would land on the first one's data.
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let store = store.unwrap_or_else(|| PathBuf::from(format!("/tmp/convoy-jepsen/run-{seed}-{started}")));
            let opts = RunOptions {
                faults,
                time_limit: Duration::from_secs(time_limit),
                rate,
                seed,
                planted_bug,
                store,
                convoy_bin,
                conversations,
                senders,
                subscribers,
                retention,
            };
            eprintln!(
                "convoy-jepsen: seed {seed}, faults {:?}, {time_limit} s, report in {}",
                opts.faults,
                opts.store.display()
            );
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
            match runtime.block_on(run::run(opts)) {
                Ok(outcome) => {
                    println!("{}", outcome.summary);
                    println!("report: {}", outcome.report_dir.display());
                    exit_code(&outcome.validity)
                }
                Err(e) => {
                    eprintln!("the run could not complete: {e:#}");
                    2
                }
            }
        }
    };
    std::process::exit(code);
}

fn exit_code(v: &Validity) -> i32 {
    match v {
        Validity::Valid => 0,
        Validity::Invalid => 1,
        Validity::Unknown => 2,
    }
}

fn check(path: &std::path::Path) -> i32 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {}: {e}", path.display());
            return 2;
        }
    };
    let history = match convoy_jepsen::history::parse(&text) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("malformed history: {e}");
            return 2;
        }
    };
    let result = checker::check(&history);
    println!("{}", serde_json::to_string_pretty(&result.to_json()).expect("results serialize"));
    exit_code(&result.valid)
}
