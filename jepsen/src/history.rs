//! The recorded history: one JSON object per line, with Jepsen's fields.
//!
//! | field     | meaning |
//! |-----------|---------|
//! | `index`   | position in the history, dense from 0 |
//! | `time`    | nanoseconds since the run started (monotonic clock of the harness) |
//! | `type`    | `invoke`, `ok`, `fail` or `info` |
//! | `process` | the logical client (a number) or `"nemesis"` |
//! | `f`       | the operation: see [`F`] |
//! | `value`   | the operation's arguments (invoke) or results (completion) |
//! | `node`    | the node the client talked to, when known |
//!
//! How client outcomes map to completion types (a timeout is never `fail`):
//!
//! | outcome of a send                                      | type   |
//! |--------------------------------------------------------|--------|
//! | `Ack{offset}`                                          | `ok`   |
//! | `InvalidInput` / `Rejected` (refused before or by apply) | `fail` |
//! | `Unavailable` through the whole deadline (every attempt definitely not applied: not leader, throttled, connect refused) | `fail` |
//! | timeout, connection lost after the request left, `Ambiguous` from the server | `info` |
//!
//! A process whose operation completed with `info` never invokes again (Jepsen's rule): the
//! runner gives it a fresh process number.

use serde::{Deserialize, Serialize};

/// Completion (or invocation) type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// Who performed an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Process {
    Client(u64),
    Nemesis(NemesisTag),
}

/// Serializes as the string `"nemesis"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NemesisTag {
    #[serde(rename = "nemesis")]
    Nemesis,
}

impl Process {
    pub const NEMESIS: Process = Process::Nemesis(NemesisTag::Nemesis);
}

/// Operation kinds.
///
/// Client operations and their `value`s:
/// - `send`: invoke `{conversation, client_id, client_seq, text}`; ok adds `{offset, ts_ms}`;
///   fail/info add `{error}`. `text` is unique per send in a run (the "value").
/// - `resend`: a deliberate retry of an already-acked `(client_id, client_seq)` with the same
///   text (a dedup probe). ok must carry the original offset.
/// - `read`: invoke `{conversation}`; ok `{conversation, messages: [[offset, text], ...]}`
///   — what the node sent from offset 1 up to its head, as it sent it (offsets unchecked, so
///   a gap shows). fail adds `{error}` and, when the node sent some messages before the
///   error, `messages` with them.
/// - `deliver`: ok only (no invoke); one message delivered to a subscriber, as the node sent
///   it (no library dedup or resubscription in between):
///   `{conversation, offset, text, session}`. `process` identifies the subscriber; `session`
///   counts its (re)subscriptions.
/// - `subscribe`: ok only; a subscriber (re)attached: `{conversation, from, session}`, and
///   `resumed_after` (why its previous stream ended) on a resubscription.
/// - `caught-up`: ok only; the node told a subscriber it had sent everything up to `head`
///   (`{conversation, head, session}`): live push follows, so the next delivery crosses the
///   catch-up → live seam.
/// - `final-read`: like `read`, after healing, from every node.
/// - `final-send`: like `send`, after healing, to prove liveness.
///
/// Nemesis operations (`process = "nemesis"`): invoke then `info`, `value` describes the fault
/// (`{nodes: [...], ...}`) and, on completion, `{outcome}`. `f` is one of `kill`, `stop`, `start`,
/// `pause`, `resume`, `partition`, `heal`, `clock-skew`, `clock-reset`, `power-fail`,
/// `corrupt`, `wipe`, `rebuild` (a node that refused to start, started again with
/// `--rejoin` on an empty data directory), and `recover`: after the final heal, the runner waits for every node to agree
/// on a leader of every shard (`{nodes}`; completes with `outcome` `recovered`, or
/// `not-recovered` and an `error`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum F {
    Send,
    Resend,
    Read,
    Deliver,
    Subscribe,
    FinalRead,
    FinalSend,
    CaughtUp,
    /// A read or subscription was told that retention deleted the messages before
    /// `earliest`.
    Truncated,
    Kill,
    /// A clean stop: SIGTERM, then the node's own shutdown (`{nodes, variant}`; completes
    /// with `outcome` `stopped`, or `killed` and the nodes that did not exit in time, and
    /// each node's exit code).
    Stop,
    Start,
    Pause,
    Resume,
    Partition,
    Heal,
    ClockSkew,
    ClockReset,
    PowerFail,
    Corrupt,
    Wipe,
    Rebuild,
    Recover,
    /// The run's retention (`{max_messages}`), recorded first by a run that has one.
    Retention,
    /// A placement change asked of the cluster (`membership`): moves, leader transfers, a
    /// rebalance's plan, a cancel. They run on after the request; nothing is undone.
    Membership,
    /// Waiting, at the end, for the moves in progress to finish before the final reads.
    Settle,
}

impl F {
    /// Nemesis operations that begin a fault period, and the operation that ends it.
    pub fn fault_end(&self) -> Option<F> {
        match self {
            F::Kill | F::Stop | F::PowerFail | F::Corrupt | F::Wipe => Some(F::Start),
            F::Pause => Some(F::Resume),
            F::Partition => Some(F::Heal),
            F::ClockSkew => Some(F::ClockReset),
            _ => None,
        }
    }
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub index: u64,
    /// Nanoseconds since the start of the run.
    pub time: u64,
    #[serde(rename = "type")]
    pub kind: Type,
    pub process: Process,
    pub f: F,
    pub value: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<u64>,
}

/// Parses a JSON-lines history.
pub fn parse(text: &str) -> Result<Vec<Op>, serde_json::Error> {
    text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect()
}

/// Renders a history as JSON lines.
pub fn render(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        out.push_str(&serde_json::to_string(op).expect("history ops serialize"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_with_jepsen_field_names() {
        let op = Op {
            index: 3,
            time: 1_000,
            kind: Type::Invoke,
            process: Process::NEMESIS,
            f: F::ClockSkew,
            value: serde_json::json!({"nodes": [1], "delta_ms": 30000}),
            node: None,
        };
        let line = serde_json::to_string(&op).expect("serialize");
        assert!(line.contains(r#""type":"invoke""#) && line.contains(r#""process":"nemesis""#), "{line}");
        assert!(line.contains(r#""f":"clock-skew""#), "{line}");
        assert_eq!(parse(&line).expect("parse"), vec![op]);
        let client = r#"{"index":0,"time":5,"type":"ok","process":7,"f":"send","value":{},"node":2}"#;
        let parsed = parse(client).expect("parse");
        assert_eq!(parsed[0].process, Process::Client(7));
        assert_eq!(parsed[0].node, Some(2));
    }
}
