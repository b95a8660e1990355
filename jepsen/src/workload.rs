//! The client workload: senders writing unique values with `(client_id, client_seq)`,
//! dedup probes, tail subscribers on every replica that drop and resume, periodic reads from
//! random replicas. Every operation goes through `convoy::client` and into the history.
//!
//! Reads and subscriptions record what the node sent, not what the client library would make
//! of it: reads use [`Client::read_raw`] (a gap is recorded, for the checker's `hole`, not
//! turned into an error), and subscribers use [`Delivery::Raw`] (no dedup, no resubscription
//! by the library) and resubscribe themselves from the offset after their last delivery, so
//! the checker's seam checks test the node's catch-up → live seam.
//!
//! Outcome classes (see `history`): an ack is `ok`; `InvalidInput`, `Rejected` and
//! `Unavailable` (every attempt definitely not applied) are `fail`; anything else —
//! timeouts, lost connections, `Ambiguous` — is `info`, and the same send is retried later
//! under a new process number with the same idempotency key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy::client::{Client, Delivery, Event, RawRead};
use convoy::config::Config;
use convoy::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use testkit::TEST_USER;

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
    match client.send_with(conv, seq, text, SEND_DEADLINE).await {
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

/// A client of the workload's user with a chosen idempotency identity.
pub fn connect_as(config: &Config, client_id: u64) -> convoy::Result<Client> {
    let credential = convoy::net::tls::Credential::of_user(config, TEST_USER)?;
    Client::connect_as(config, &credential, client_id, 1)
}

/// A sender: unique values, retries after indeterminate outcomes, dedup probes.
pub async fn sender(rec: Recorder, config: Config, opts: WorkloadOptions, index: usize, stop: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(opts.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let client_id = (opts.seed << 16) ^ (index as u64 + 1) ^ 0x5eed_0000_0000_0000;
    let Ok(client) = connect_as(&config, client_id) else { return };
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

/// Pause after a subscriber's stream delivered nothing, per such stream in a row …
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(100);
/// … up to this much.
const RESUBSCRIBE_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A subscriber pinned to one replica; every so often it drops its subscription and resumes
/// from the offset after the last one it saw. Its streams are raw ([`Delivery::Raw`]): when
/// one ends (the node ended it, an error, a broken connection) this loop, not the library,
/// resubscribes, and [`SubscriberLog`] records every event in between.
pub async fn subscriber(rec: Recorder, config: Config, opts: WorkloadOptions, index: usize, stop: Arc<AtomicBool>) {
    let Ok(client) = Client::connect_user(&config, TEST_USER) else { return };
    let conv = conversation(index % opts.conversations);
    let node = (index % 3) as u64 + 1;
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(7 + index as u64));
    let mut log = SubscriberLog::new(rec, SUBSCRIBER_BASE + index as u64, &conv, node);
    let mut empty_streams = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut sub = client.subscribe_with(&conv, log.next_offset, Some(node), Delivery::Raw);
        let lifetime = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(4_000..12_000));
        let delivered = log.deliveries;
        loop {
            let ev = tokio::select! {
                ev = sub.next() => ev,
                _ = tokio::time::sleep_until(lifetime) => {
                    log.dropped("the subscriber dropped it");
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stop.load(Ordering::Relaxed) {
                        log.dropped("the run stopped");
                        break;
                    }
                    continue;
                }
            };
            let Some(ev) = ev else {
                log.dropped("the subscription ended without saying why");
                break;
            };
            if !log.on_event(ev) {
                break;
            }
        }
        drop(sub);
        empty_streams = if log.deliveries > delivered { 0 } else { empty_streams.saturating_add(1) };
        if empty_streams > 0 {
            tokio::time::sleep(RESUBSCRIBE_PAUSE.saturating_mul(empty_streams).min(RESUBSCRIBE_PAUSE_MAX)).await;
        }
    }
}

/// A subscriber's history: every event of its raw streams as the node sent it, and the
/// offset its next stream starts from.
pub struct SubscriberLog {
    rec: Recorder,
    process: Process,
    conversation: String,
    /// The node of the current stream.
    node: u64,
    /// The offset after the last one delivered: where the next stream starts.
    pub next_offset: u64,
    /// Streams attached so far.
    session: u64,
    /// Messages delivered so far.
    pub deliveries: u64,
    /// Why the last stream ended, recorded with the next subscribe.
    ended: Option<String>,
}

impl SubscriberLog {
    pub fn new(rec: Recorder, process: u64, conversation: &str, node: u64) -> Self {
        SubscriberLog {
            rec,
            process: Process::Client(process),
            conversation: conversation.to_string(),
            node,
            next_offset: 1,
            session: 0,
            deliveries: 0,
            ended: None,
        }
    }

    /// Records one event of a raw stream; false when it was the stream's end.
    pub fn on_event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Attached { node, from } => {
                self.session += 1;
                self.node = node;
                let mut v = json!({"conversation": self.conversation, "from": from, "session": self.session});
                if let Some(why) = self.ended.take() {
                    v["resumed_after"] = json!(why);
                }
                self.rec.record(Type::Ok, self.process, F::Subscribe, v, Some(node));
            }
            Event::Message(m) => {
                // Resume after the last delivery, whatever it was: the checker compares.
                self.next_offset = m.offset + 1;
                self.deliveries += 1;
                let v = json!({"conversation": m.conversation, "offset": m.offset, "text": m.text, "session": self.session});
                self.rec.record(Type::Ok, self.process, F::Deliver, v, Some(self.node));
            }
            Event::CaughtUp { head } => {
                let v = json!({"conversation": self.conversation, "head": head, "session": self.session});
                self.rec.record(Type::Ok, self.process, F::CaughtUp, v, Some(self.node));
            }
            Event::Truncated { earliest } => {
                // The stream goes on from `earliest`; a resubscription would start there too.
                self.next_offset = self.next_offset.max(earliest);
                let v = json!({"conversation": self.conversation, "earliest": earliest, "session": self.session});
                self.rec.record(Type::Ok, self.process, F::Truncated, v, Some(self.node));
            }
            Event::Failed(why) => {
                self.ended = Some(why);
                return false;
            }
            // Only a followed subscription waits; this one is raw: its stream ends instead.
            Event::Waiting { .. } => {}
        }
        true
    }

    /// The subscriber ended the stream itself.
    pub fn dropped(&mut self, why: &str) {
        self.ended = Some(why.to_string());
    }
}

/// Reads conversations from random replicas now and then.
pub async fn reader(rec: Recorder, config: Config, opts: WorkloadOptions, stop: Arc<AtomicBool>) {
    let Ok(client) = Client::connect_user(&config, TEST_USER) else { return };
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
    let (kind, value) = match tokio::time::timeout(Duration::from_secs(10), client.read_raw(conv, 1, node)).await {
        Ok(read) => read_outcome(conv, &read),
        Err(_) => (Type::Fail, json!({"conversation": conv, "error": "timeout"})),
    };
    rec.record(kind, Process::Client(process), f, value, Some(node));
    kind
}

/// The completion of a read that got `read`: ok with every message as the node sent it (a gap
/// included, for the checker's `hole`), or fail with the error and the messages received
/// before it (they are what the node sent, and are checked too).
pub fn read_outcome(conv: &str, read: &RawRead) -> (Type, Value) {
    let messages: Vec<Value> = read.messages.iter().map(|m| json!([m.offset, m.text])).collect();
    match &read.end {
        Ok(_) => {
            let mut v = json!({"conversation": conv, "messages": messages});
            if let Some(earliest) = read.truncated_before {
                v["truncated_before"] = json!(earliest);
            }
            (Type::Ok, v)
        }
        Err(e) => {
            let mut v = json!({"conversation": conv, "error": e.to_string()});
            if !messages.is_empty() {
                v["messages"] = Value::Array(messages);
            }
            (Type::Fail, v)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use convoy::chat::StoredMessage;

    use super::*;
    use crate::checker::{self, kinds, CheckResult};

    fn stored(offset: u64, text: &str) -> StoredMessage {
        StoredMessage {
            conversation: "c".into(),
            offset,
            sender: "jepsen".into(),
            ts_ms: 1,
            client_id: 1,
            client_seq: offset,
            text: text.into(),
        }
    }

    /// A history whose sends put a, b, c, d at offsets 1–4 of conversation c.
    fn sent() -> Recorder {
        let rec = Recorder::default();
        for (i, t) in ["a", "b", "c", "d"].iter().enumerate() {
            let v = json!({"conversation": "c", "client_id": 1, "client_seq": i + 1, "text": t});
            rec.record(Type::Invoke, Process::Client(1), F::Send, v.clone(), None);
            let mut ok = v;
            ok["offset"] = json!(i + 1);
            rec.record(Type::Ok, Process::Client(1), F::Send, ok, None);
        }
        rec
    }

    fn kinds_of(r: &CheckResult) -> BTreeSet<&'static str> {
        r.anomalies.iter().map(|a| a.kind).collect()
    }

    /// Feeds raw subscription events to a subscriber's log and checks the history.
    fn subscriber_sees(events: Vec<Event>) -> CheckResult {
        let rec = sent();
        let mut log = SubscriberLog::new(rec.clone(), SUBSCRIBER_BASE, "c", 2);
        for ev in events {
            if !log.on_event(ev) {
                break;
            }
        }
        checker::check(&rec.snapshot())
    }

    fn seam_then(live: &[(u64, &str)]) -> Vec<Event> {
        let mut events = vec![
            Event::Attached { node: 2, from: 1 },
            Event::Message(stored(1, "a")),
            Event::Message(stored(2, "b")),
            Event::CaughtUp { head: 2 },
        ];
        events.extend(live.iter().map(|(o, t)| Event::Message(stored(*o, t))));
        events
    }

    #[test]
    fn a_repeat_at_the_seam_reaches_the_checker() {
        let r = subscriber_sees(seam_then(&[(2, "b"), (3, "c")]));
        assert_eq!(kinds_of(&r), BTreeSet::from([kinds::SUBSCRIBER_REPEAT]), "{:#?}", r.anomalies);
        assert!(r.anomalies[0].explanation.contains("seam"), "{}", r.anomalies[0].explanation);
    }

    #[test]
    fn a_skip_at_the_seam_reaches_the_checker() {
        let r = subscriber_sees(seam_then(&[(4, "d")]));
        assert_eq!(kinds_of(&r), BTreeSet::from([kinds::SUBSCRIBER_SKIP]), "{:#?}", r.anomalies);
        assert!(r.anomalies[0].explanation.contains("seam"), "{}", r.anomalies[0].explanation);
    }

    #[test]
    fn a_clean_seam_and_resume_pass() {
        let rec = sent();
        let mut log = SubscriberLog::new(rec.clone(), SUBSCRIBER_BASE, "c", 2);
        for ev in seam_then(&[(3, "c")]) {
            assert!(log.on_event(ev));
        }
        assert!(!log.on_event(Event::Failed("node 2 ended the stream".into())));
        assert_eq!(log.next_offset, 4, "the next stream starts after the last delivery");
        log.on_event(Event::Attached { node: 2, from: log.next_offset });
        log.on_event(Event::Message(stored(4, "d")));
        let history = rec.snapshot();
        let resumed = history.iter().rev().find(|o| o.f == F::Subscribe).expect("a resubscribe");
        assert_eq!(resumed.value["from"], 4);
        assert_eq!(resumed.value["session"], 2);
        assert_eq!(resumed.value["resumed_after"], "node 2 ended the stream");
        let r = checker::check(&history);
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
    }

    #[test]
    fn a_read_with_a_gap_is_recorded_as_it_came_and_is_a_hole() {
        let read = RawRead {
            messages: vec![stored(1, "a"), stored(2, "b"), stored(4, "d")],
            truncated_before: None,
            end: Ok(4),
        };
        let (kind, value) = read_outcome("c", &read);
        assert_eq!(kind, Type::Ok);
        assert_eq!(value["messages"], json!([[1, "a"], [2, "b"], [4, "d"]]));
        let rec = sent();
        rec.record(Type::Invoke, Process::Client(READER_BASE), F::Read, json!({"conversation": "c"}), Some(3));
        rec.record(kind, Process::Client(READER_BASE), F::Read, value, Some(3));
        let r = checker::check(&rec.snapshot());
        assert_eq!(kinds_of(&r), BTreeSet::from([kinds::HOLE]), "{:#?}", r.anomalies);
        assert!(r.anomalies[0].explanation.contains("offset 3 is missing"), "{}", r.anomalies[0].explanation);
    }

    #[test]
    fn a_read_that_failed_keeps_what_it_got() {
        let read = RawRead {
            messages: vec![stored(1, "a")],
            truncated_before: None,
            end: Err(Error::Unavailable("node 1 stalled".into())),
        };
        let (kind, value) = read_outcome("c", &read);
        assert_eq!(kind, Type::Fail);
        assert_eq!(value["messages"], json!([[1, "a"]]));
        assert!(value["error"].as_str().is_some_and(|e| e.contains("node 1 stalled")), "{value}");
        let nothing =
            RawRead { messages: Vec::new(), truncated_before: None, end: Err(Error::Unavailable("refused".into())) };
        assert!(read_outcome("c", &nothing).1.get("messages").is_none());
    }
}
