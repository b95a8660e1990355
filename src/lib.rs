//! convoy: a replicated, log-based message store for real-time chat.
//!
//! Map of the system, from the bottom up. Dependencies point one way: a module uses only
//! the modules listed before it in [`LAYERS`], and a unit test below checks every
//! `crate::…` path of every source file against that table.
//!
//! - [`error`], [`decode`], [`stages`], [`planted`]: the crate's error, bincode decoding
//!   with an allocation limit, the send path's latency histograms, and the test-only
//!   planted bugs. They use nothing of the crate.
//! - [`chat`]: the domain and its pure, deterministic apply (offsets, dedup, cursors, limits).
//! - [`config`]: `cluster.toml` → a validated [`config::Config`]; it imports nothing above
//!   `chat`.
//! - [`store`]: RocksDB — the on-disk schema, group commit, shard snapshots.
//! - [`net`]: transport and the client protocol only — TLS material, QUIC limits, frames,
//!   lanes, the client's messages.
//! - [`raft`]: openraft wiring — type config, log store and state machine over `store`, and
//!   the peer protocol and its transport over `net`'s frames.
//! - [`service`]: client requests → proposals, reads, subscriptions, live push.
//! - [`server`]: the client accept loop and one handler per request stream.
//! - [`node`]: a node's start and stop, with the shutdown passed in.
//! - [`client`]: the Rust client the CLI, tests, bench and jepsen use; it speaks only
//!   `net` and `chat`, never storage or Raft.
//!
//! The promises (see the README): an `Ack` means committed by a quorum and fsynced there;
//! offsets are dense and the same on every replica; retries with the same
//! `(client_id, client_seq)` never append twice; a subscriber sees every message once,
//! in order, across catch-up and live push.

pub mod chat;
pub mod client;
pub mod config;
pub mod decode;
pub mod error;
pub mod net;
pub mod node;
pub mod planted;
pub mod raft;
pub mod server;
pub mod service;
pub mod stages;
pub mod store;

pub use error::{Error, Result};

/// The dependency rule: each top-level module and the crate modules it may use. A module
/// not listed here fails the rule's test until it is placed.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("decode", &[]),
    ("stages", &[]),
    ("planted", &[]),
    ("chat", &["error"]),
    ("config", &["error", "chat"]),
    ("store", &["error", "decode", "stages", "planted", "chat", "config"]),
    ("net", &["error", "decode", "stages", "chat", "config"]),
    ("raft", &["error", "stages", "planted", "chat", "config", "store", "net"]),
    ("service", &["error", "stages", "planted", "chat", "config", "store", "net", "raft"]),
    ("server", &["error", "stages", "chat", "config", "net", "service"]),
    ("node", &["error", "stages", "chat", "config", "store", "net", "raft", "service", "server"]),
    ("client", &["error", "stages", "chat", "config", "net"]),
];

#[cfg(test)]
mod dependency_rule {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::LAYERS;

    /// The crate modules a line of code names through `crate::…` (comments are skipped:
    /// a doc link is not a dependency).
    fn named_modules(line: &str) -> Vec<String> {
        let code = line.trim_start();
        if code.starts_with("//") {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                // `use crate::{a, b::c}`: every first segment inside the braces.
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        out.push(name);
                    }
                }
            } else {
                let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
            rest = after;
        }
        out
    }

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).expect("the source tree is readable");
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The violations of the rule in the crate's sources: `(file, line, module, named)`.
    fn violations(src: &Path) -> Vec<(String, usize, String, String)> {
        let mut files = Vec::new();
        sources(src, &mut files);
        files.sort();
        let mut found = Vec::new();
        for file in files {
            let rel = file.strip_prefix(src).expect("under src").to_string_lossy().into_owned();
            // The binary is another crate (it says `convoy::`); lib.rs holds the rule.
            if rel.starts_with("bin/") || rel == "lib.rs" {
                continue;
            }
            let module = rel.split(['/', '.']).next().unwrap_or("").to_string();
            let allowed: BTreeSet<&str> = match LAYERS.iter().find(|(m, _)| *m == module) {
                Some((_, uses)) => uses.iter().copied().collect(),
                None => {
                    found.push((rel.clone(), 0, module.clone(), "<not in LAYERS>".to_string()));
                    continue;
                }
            };
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            for (i, line) in text.lines().enumerate() {
                for named in named_modules(line) {
                    if named != module && !allowed.contains(named.as_str()) {
                        found.push((rel.clone(), i + 1, module.clone(), named));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_module_uses_only_the_layers_below_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let found = violations(&src);
        assert!(found.is_empty(), "modules reaching up or sideways (file, line, module, names): {found:#?}");
    }

    #[test]
    fn the_rule_is_acyclic_and_lists_every_module_once() {
        let mut seen = BTreeSet::new();
        for (module, uses) in LAYERS {
            for used in *uses {
                assert!(seen.contains(used), "{module} uses {used}, which is not below it");
            }
            assert!(seen.insert(*module), "{module} is listed twice");
        }
    }

    #[test]
    fn the_checker_sees_grouped_and_inline_paths_and_skips_comments() {
        assert_eq!(named_modules("use crate::service::{self, Service};"), ["service"]);
        assert_eq!(named_modules("use crate::{chat, net::frame};"), ["chat", "net"]);
        assert_eq!(named_modules("    let x = crate::store::codec::encode(&m);"), ["store"]);
        assert!(named_modules("/// see [`crate::service`]").is_empty());
        // A forbidden line is caught: `net` may not use `service`.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("net")).expect("mkdir");
        std::fs::write(dir.path().join("net/bad.rs"), "use crate::service::Service;\n").expect("write");
        std::fs::write(dir.path().join("chat.rs"), "use crate::error::Error;\n").expect("write");
        let found = violations(dir.path());
        assert_eq!(found, [("net/bad.rs".to_string(), 1, "net".to_string(), "service".to_string())]);
    }
}
