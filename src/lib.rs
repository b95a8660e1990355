//! convoy: a replicated, log-based message store for real-time chat.
//!
//! Map of the system, from the bottom up. Dependencies point one way: a module uses only
//! the modules listed before it in [`LAYERS`], and a unit test below checks every
//! `crate::…` path of every source file against that table.
//!
//! - [`error`], [`decode`], [`stages`], [`planted`]: the crate's error, bincode decoding
//!   with an allocation limit, the send path's latency histograms, and the test-only
//!   planted bugs. They use nothing of the crate.
//! - [`placement`]: the cluster map (nodes, where each shard lives, its preferred leader) and
//!   its deterministic apply; the metadata group's state.
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
//! - [`client`]: the Rust client the CLI, tests, bench and jepsen use; it speaks `net` and
//!   `chat` (and reads `config` to find the nodes and its credential), never storage or Raft.
//! - [`admin`]: every node's status folded into the operator's view of the cluster.
//!
//! The promises (see the README): an `Ack` means committed by a quorum and fsynced there;
//! offsets are dense and the same on every replica; retries with the same
//! `(client_id, client_seq)` never append twice; a subscriber sees every message once,
//! in order, across catch-up and live push.

pub mod admin;
pub mod chat;
pub mod client;
pub mod config;
pub mod decode;
pub mod error;
pub mod metrics;
pub mod net;
pub mod node;
pub mod placement;
pub mod planted;
pub mod raft;
pub mod server;
pub mod service;
pub mod stages;
pub mod store;

pub use error::{Error, Result};

/// The dependency rule: each top-level module and the crate modules it may use, no more
/// than it does use. A module not listed here fails the rule's test until it is placed.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("decode", &[]),
    ("stages", &[]),
    ("planted", &[]),
    ("placement", &[]),
    ("chat", &["error", "placement"]),
    ("config", &["error", "chat"]),
    ("store", &["error", "decode", "stages", "planted", "placement", "chat"]),
    ("net", &["error", "decode", "stages", "placement", "chat", "config"]),
    ("raft", &["error", "decode", "stages", "planted", "placement", "chat", "config", "store", "net"]),
    ("service", &["error", "stages", "planted", "placement", "chat", "config", "store", "net", "raft"]),
    ("server", &["error", "placement", "net", "service"]),
    ("metrics", &["error", "service"]),
    ("node", &["error", "planted", "placement", "config", "store", "net", "raft", "service", "server", "metrics"]),
    ("client", &["error", "chat", "config", "net"]),
    ("admin", &["placement", "net"]),
];

#[cfg(test)]
mod dependency_rule {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::LAYERS;

    /// The code of a source file without its comments (a doc link is not a dependency).
    fn code_of(text: &str) -> String {
        text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
    }

    /// The first path segment of each top-level item of a `{…}` group starting at `group`
    /// (after the `{`), nested groups skipped; `*` stands for a glob.
    fn group_heads(group: &str) -> Vec<String> {
        let mut heads = Vec::new();
        let (mut depth, mut item) = (0usize, String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    heads.push(std::mem::take(&mut item));
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                item.push(c);
            }
        }
        heads.push(item);
        heads
            .iter()
            .filter_map(|item| {
                let item = item.trim();
                let head: String = item.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '*').collect();
                (!head.is_empty()).then_some(head)
            })
            .collect()
    }

    /// The crate modules some code names through `crate::…` (single paths, groups over
    /// several lines, nested groups, globs as `*`), and `crate` itself for `use crate as x`,
    /// which would hide the paths behind the alias. Comments are skipped. `super::` is not
    /// followed: every file's `super` is its own module's parent, and a test module's
    /// `use super::*` is the file itself.
    fn named_modules(text: &str) -> Vec<String> {
        let code = code_of(text);
        let mut out = Vec::new();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate") {
            let before = code.len() - rest.len() + at;
            let after = &rest[at + "crate".len()..];
            let word_start = before == 0 || {
                let prev = code[..before].chars().next_back().unwrap_or(' ');
                !(prev.is_alphanumeric() || prev == '_' || prev == ':')
            };
            if word_start {
                if let Some(path) = after.strip_prefix("::") {
                    if let Some(group) = path.strip_prefix('{') {
                        out.extend(group_heads(group));
                    } else {
                        let head: String =
                            path.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '*').collect();
                        if !head.is_empty() {
                            out.push(head);
                        }
                    }
                } else if after.trim_start().starts_with("as ") {
                    out.push("crate".to_string());
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
            let mut offset = 0;
            for (i, line) in text.lines().enumerate() {
                let start = offset;
                offset += line.len() + 1;
                // A group may span lines: read it whole, from this line to its `;`.
                let code = code_of(line);
                let names = match code.find("crate::{") {
                    Some(at) => {
                        let from = &text[(start + at).min(text.len())..];
                        named_modules(&from[..from.find(';').unwrap_or(from.len())])
                    }
                    None => named_modules(line),
                };
                for named in names {
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
        assert_eq!(
            named_modules("use crate::{\n    chat::Outcome,\n    net::{frame, wire},\n    service,\n};"),
            ["chat", "net", "service"]
        );
        assert_eq!(named_modules("use crate::*;"), ["*"]);
        assert_eq!(named_modules("use crate as c;"), ["crate"]);
        assert_eq!(named_modules("    let x = crate::store::codec::encode(&m);"), ["store"]);
        assert!(named_modules("/// see [`crate::service`]").is_empty());
        assert!(named_modules("let s = other_crate::service::x; // crate::service").is_empty());
        // A forbidden line is caught: `net` may not use `service`.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("net")).expect("mkdir");
        std::fs::write(dir.path().join("net/bad.rs"), "use crate::service::Service;\n").expect("write");
        std::fs::write(dir.path().join("net/group.rs"), "use crate::{\n    chat,\n    raft::rpc,\n};\n")
            .expect("write");
        std::fs::write(dir.path().join("chat.rs"), "use crate::error::Error;\n").expect("write");
        let found = violations(dir.path());
        assert_eq!(
            found,
            [
                ("net/bad.rs".to_string(), 1, "net".to_string(), "service".to_string()),
                ("net/group.rs".to_string(), 1, "net".to_string(), "raft".to_string()),
            ]
        );
    }
}
