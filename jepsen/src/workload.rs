//! The client workload: senders writing unique values with `(client_id, client_seq)`,
//! dedup probes, tail subscribers on every replica that drop and resume, periodic reads from
//! random replicas. Every operation goes through `convoy::client` and into the history.
//!
//! Outcome classes (see `history`): an ack is `ok`; `InvalidInput`, `Rejected` and
//! `Unavailable` (every attempt definitely not applied) are `fail`; anything else —
//! timeouts, lost connections, `Ambiguous` — is `info`, and the same send is retried later
//! under a new process number with the same idempotency key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy::client::{Client, Event};
use convoy::config::Config;
use convoy::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::history::{Process, Type, F};
use crate::recorder::Recorder;

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub conversations: usize,
    pub senders: usize,
    pub subscribers: usize,
    /// Total send rate, operations per second.
    pub rate: f64,
    pub seed: u64,
}

/// How long one send may keep retrying inside the client library.
pub const SEND_DEADLINE: Duration = Duration::from_secs(8);
/// Retries of an indeterminate send (same key), at most.
pub const INFO_RETRIES: usize = 3;

pub fn conversation(i: usize) -> String {
    format!("jepsen-{i}")
}

/// Process numbers: senders use [0, 1000) and get a fresh number (+1000·k) after an info;
/// subscribers use 100_000+; readers 200_000+.
const SUBSCRIBER_BASE: u64 = 100_000;
const READER_BASE: u64 = 200_000;

fn class(e: &Error) -> Type {
    match e {
        Error::InvalidInput(_) | Error::Rejected(_) | Error::Unavailable(_) => Type::Fail,
        _ => Type::Info,
    }
}

/// One send (or resend) with its history entries; returns the completion type.
pub async fn send_op(
    rec: &Recorder,
    client: &Client,
    process: u64,
    f: F,
    conv: &str,
    seq: u64,
    text: &str,
) -> (Type, Option<u64>) {
    let base = json!({"conversation": conv, "client_id": client.client_id(), "client_seq": seq, "text": text});
    rec.record(Type::Invoke, Process::Client(process), f.clone(), base.clone(), None);
    match client.send_with(conv, "jepsen", seq, text, SEND_DEADLINE).await {
        Ok(ack) => {
            let mut v = base;
            v["offset"] = json!(ack.offset);
            v["ts_ms"] = json!(ack.ts_ms);
            v["duplicate"] = json!(ack.duplicate);
            rec.record(Type::Ok, Process::Client(process), f, v, None);
            (Type::Ok, Some(ack.offset))
        }
        Err(e) => {
            let kind = class(&e);
            let mut v = base;
            v["error"] = json!(e.to_string());
            rec.record(kind, Process::Client(process), f, v, None);
            (kind, None)
        }
    }
}

/// A sender: unique values, retries after indeterminate outcomes, dedup probes.
pub async fn sender(rec: Recorder, config: Config, opts: WorkloadOptions, index: usize, stop: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(opts.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let client_id = (opts.seed << 16) ^ (index as u64 + 1) ^ 0x5eed_0000_0000_0000;
    let Ok(client) = Client::connect_as(&config, client_id, 1) else { return };
    let mut process = index as u64;
    let mut seq = 0u64;
    let mut acked: Vec<(String, u64, String)> = Vec::new();
    let per_sender = opts.rate / opts.senders as f64;
    let interval = Duration::from_secs_f64(1.0 / per_sender.max(0.01));
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += interval;
        tokio::time::sleep_until(next).await;
        if !acked.is_empty() && rng.gen_bool(0.05) {
            let (conv, s, text) = acked[rng.gen_range(0..acked.len())].clone();
            let (kind, _) = send_op(&rec, &client, process, F::Resend, &conv, s, &text).await;
            if kind == Type::Info {
                process += 1000;
            }
            continue;
        }
        seq += 1;
        let conv = conversation(rng.gen_range(0..opts.conversations));
        let text = format!("v{index}-{seq}");
        for attempt in 0..=INFO_RETRIES {
            let (kind, _) = send_op(&rec, &client, process, F::Send, &conv, seq, &text).await;
            match kind {
                Type::Ok => {
                    acked.push((conv.clone(), seq, text.clone()));
                    break;
                }
                Type::Info => {
                    // Jepsen's rule: an indeterminate process never invokes again.
                    process += 1000;
                    if attempt == INFO_RETRIES || stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
}

/// A subscriber pinned to one replica; every so often it drops its subscription and resumes
/// from the offset after the last one it saw.
pub async fn subscriber(rec: Recorder, config: Config, opts: WorkloadOptions, index: usize, stop: Arc<AtomicBool>) {
    let Ok(client) = Client::connect(&config) else { return };
    let process = SUBSCRIBER_BASE + index as u64;
    let conv = conversation(index % opts.conversations);
    let node = (index % 3) as u64 + 1;
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(7 + index as u64));
    let mut next_offset = 1u64;
    let mut session = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut sub = client.subscribe(&conv, next_offset, Some(node));
        let lifetime = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(4_000..12_000));
        loop {
            let ev = tokio::select! {
                ev = sub.next() => ev,
                _ = tokio::time::sleep_until(lifetime) => None,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stop.load(Ordering::Relaxed) { None } else { continue }
                }
            };
            match ev {
                Some(Event::Attached { node, from }) => {
                    session += 1;
                    rec.record(
                        Type::Ok,
                        Process::Client(process),
                        F::Subscribe,
                        json!({"conversation": conv, "from": from, "session": session}),
                        Some(node),
                    );
                }
                Some(Event::Message(m)) => {
                    next_offset = m.offset + 1;
                    rec.record(
                        Type::Ok,
                        Process::Client(process),
                        F::Deliver,
                        json!({"conversation": m.conversation, "offset": m.offset, "text": m.text, "session": session}),
                        Some(node),
                    );
                }
                Some(Event::CaughtUp { .. }) => {}
                Some(Event::Failed(_)) | None => break,
            }
        }
    }
}

/// Reads conversations from random replicas now and then.
pub async fn reader(rec: Recorder, config: Config, opts: WorkloadOptions, stop: Arc<AtomicBool>) {
    let Ok(client) = Client::connect(&config) else { return };
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(99));
    let mut process = READER_BASE;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
        let conv = conversation(rng.gen_range(0..opts.conversations));
        let node = rng.gen_range(1..=3u64);
        if read_op(&rec, &client, process, F::Read, &conv, node).await != Type::Ok {
            process += 1;
        }
    }
}

/// One read of a whole conversation from one replica, recorded.
pub async fn read_op(rec: &Recorder, client: &Client, process: u64, f: F, conv: &str, node: u64) -> Type {
    rec.record(Type::Invoke, Process::Client(process), f.clone(), json!({"conversation": conv}), Some(node));
    match tokio::time::timeout(Duration::from_secs(10), client.read(conv, 1, Some(node))).await {
        Ok(Ok(msgs)) => {
            let messages: Vec<serde_json::Value> = msgs.iter().map(|m| json!([m.offset, m.text])).collect();
            rec.record(
                Type::Ok,
                Process::Client(process),
                f,
                json!({"conversation": conv, "messages": messages}),
                Some(node),
            );
            Type::Ok
        }
        Ok(Err(e)) => {
            rec.record(
                Type::Fail,
                Process::Client(process),
                f,
                json!({"conversation": conv, "error": e.to_string()}),
                Some(node),
            );
            Type::Fail
        }
        Err(_) => {
            rec.record(
                Type::Fail,
                Process::Client(process),
                f,
                json!({"conversation": conv, "error": "timeout"}),
                Some(node),
            );
            Type::Fail
        }
    }
}
