//! The checker: reads a recorded [history](crate::history) and reports every broken promise as
//! an [`Anomaly`] with a minimal witness (the few ops that prove it).
//!
//! A pure function of the history: no I/O, no clock, deterministic output.
//!
//! ## Observations
//!
//! A *value* is a send's text: unique per logical send in a run (a send retried after an
//! indeterminate outcome, and a `resend` dedup probe, carry the same text and the same
//! `(client_id, client_seq)`). Offsets are per conversation. Texts are observed by
//! - `read` and `final-read` (`messages: [[offset, text], ...]`, which must be dense from 1,
//!   or from `truncated_before` when the node said retention deleted what came before): ok
//!   ones, and failed ones that carry the messages the node sent before the error,
//! - ok `deliver` (one message, as the node sent it),
//! - ok `send` / `resend` / `final-send` (an *ack*: the text is at `offset`).
//!
//! A subscriber's `subscribe`, `deliver` and `caught-up` ops, in history order, are its
//! stream as the node sent it: the first delivery after a `caught-up` is the catch-up → live
//! seam, and an anomaly there says so and shows the `caught-up` in its witness.
//!
//! ## Retention
//!
//! A run with retention records it first (a nemesis `retention` op, `{max_messages: N}`).
//! Messages below the earliest offset a node reports are gone on purpose: a read says
//! `truncated_before: E` and is dense from `E`; a subscriber's `truncated` op moves its next
//! offset to `E`; an acked text below the earliest of a node's final read is not missing
//! there (it is counted in `acked_trimmed` when no final read holds it). What retention
//! must not do is keep less than it promised: a read that says it was truncated and holds
//! fewer than `N` messages is `over-trimmed`.
//!
//! The dedup window is what is retained: a trimmed message's idempotency record goes with
//! it, so a retry or resend of its key after the trim is stored again, as a new message.
//! Retention keeps at least `N` messages: when a message is appended at offset `O'`, the
//! earliest is at most `O' - N`, so a key stored at `O` and again at `O' <= O + N` was still
//! retained, and that is a `duplicate` (and a resend acked elsewhere a `resend-mismatch`) as
//! without retention. More than `N` apart, the first may have been trimmed when the second
//! was appended, and the pair is counted in `rewritten_after_trim` instead.
//!
//! Completions are paired with the latest invoke of the same process (Jepsen's rule).
//! `info` completions and invokes that never complete are indeterminate: the value may or
//! may not appear, and only its uniqueness is checked.
//!
//! ## Checks (anomaly kinds, see [`kinds`])
//!
//! | kind | meaning |
//! |------|---------|
//! | `inconsistent-offset` | one (conversation, offset) observed holding two different texts |
//! | `duplicate` | one text observed at two different (conversation, offset) places |
//! | `lost` | an acked text absent from the final read of every node |
//! | `lost-on-node` | acked texts absent from one node's final read but present on another (one anomaly per node and conversation) |
//! | `read-of-failed` | a text observed although every send carrying it completed `fail` |
//! | `phantom` | a text observed that no send ever carried |
//! | `ack-mismatch` | an ack says offset O but the text is observed only elsewhere |
//! | `hole` | a read whose messages are not exactly offsets `1..=n` in order |
//! | `subscriber-skip` | a subscriber jumped over an offset (also at a resume, and at the seam: a delivery past the next offset, or a `caught-up` whose head is past what was delivered) |
//! | `subscriber-repeat` | a subscriber went back to an offset it had (also at a resume and at the seam) |
//! | `resend-mismatch` | a resend acked at a different place than the original send |
//! | `real-time-order` | a send invoked after another completed got a lower offset |
//! | `unconverged` | final reads of one conversation differ between nodes |
//! | `over-trimmed` | a read that says retention deleted messages before it holds fewer than the retention keeps |
//! | `regressed-read` | a read of a conversation on a node ends at a lower offset than a read of it on the same node that completed before it was invoked: the node answered from an older state than it had shown (a restarted replica serving its state from before its log was applied again) |
//! | `final-send-failed` | a liveness `final-send` after healing did not complete ok (unless a majority of nodes refused to start after damage: then it is expected, and the run is unknown) |
//! | `unavailable` | a send to a shard that kept a majority of voters holding its log, with no other fault in effect, waited more than 5 s (see below) |
//!
//! An acked text that no final read shows is reported as `lost` only (never also as
//! "acked but unseen"). A resend whose ack is already a `resend-mismatch` is not reported
//! again as an `ack-mismatch`; an ack whose text is observed both at the acked place and
//! elsewhere is a `duplicate`, not an `ack-mismatch`.
//!
//! ## Validity
//!
//! The first row that applies decides; [`CheckResult::notes`] says why a result is unknown.
//!
//! | the history has | verdict |
//! |-----------------|---------|
//! | any anomaly | invalid |
//! | no acked send | unknown |
//! | no ok `final-read` at all | unknown |
//! | a conversation with acked sends that no node read at the end | unknown |
//! | a `final-read` that did not complete ok (failed, indeterminate, never completed), or a node without a `final-read` of a conversation that must be read (one with an ack or a `final-read` op) where the node is named by any client op | unknown |
//! | a `recover` that did not complete `recovered` (the cluster did not elect leaders again after the final heal) | unknown |
//! | a failed `final-send` after a majority of nodes refused to start after damage (`corrupt-majority`) | unknown |
//! | otherwise | valid |
//!
//! A node that cannot be read at the end, or does not recover, is undecided rather than
//! invalid: by itself it breaks no promise about data (a replica that finds its storage damaged
//! must refuse to serve), but it leaves that node unchecked for loss and convergence, so the
//! run proves nothing about it and must not pass. What it did send is still checked: the
//! messages of a failed read are observations (a conflict among them is invalid), only not a
//! final state to compare. Liveness after healing is `final-send-failed`, an anomaly.
//!
//! ## Availability
//!
//! Most faults may stop a shard for a while, legitimately: a killed leader's shard waits for
//! an election, a partition may leave no majority. One fault may not: the nemesis's
//! `membership` op of variant `move-with-voter-down` is run with no other fault in effect,
//! kills one follower of shard S (`down`; never its leader) just before its invoke, asks a
//! move of S's other follower, and records its info when the move has ended or 30 s passed.
//! Until then S has two voters up that hold its whole log, its leader and the follower
//! moving, and a correct move keeps that follower voting until the new replica has caught
//! up. So every send to S's `conversations` invoked from 1 s after the invoke to the info
//! must complete within 5 s: one that completes later, not at all, or `info` after waiting
//! longer is `unavailable`, one anomaly per such fault (with its longest wait). A send that
//! fails fast is not counted: it did not wait.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::history::{Op, Process, Type, F};

/// The anomaly kinds, as reported in [`Anomaly::kind`].
pub mod kinds {
    pub const INCONSISTENT_OFFSET: &str = "inconsistent-offset";
    pub const DUPLICATE: &str = "duplicate";
    pub const LOST: &str = "lost";
    pub const LOST_ON_NODE: &str = "lost-on-node";
    pub const READ_OF_FAILED: &str = "read-of-failed";
    pub const PHANTOM: &str = "phantom";
    pub const ACK_MISMATCH: &str = "ack-mismatch";
    pub const HOLE: &str = "hole";
    pub const SUBSCRIBER_SKIP: &str = "subscriber-skip";
    pub const SUBSCRIBER_REPEAT: &str = "subscriber-repeat";
    pub const RESEND_MISMATCH: &str = "resend-mismatch";
    pub const REAL_TIME_ORDER: &str = "real-time-order";
    pub const UNCONVERGED: &str = "unconverged";
    pub const FINAL_SEND_FAILED: &str = "final-send-failed";
    pub const OVER_TRIMMED: &str = "over-trimmed";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const UNCLEAN_STOP: &str = "unclean-stop";
    pub const REGRESSED_READ: &str = "regressed-read";

    /// Every kind, in the order anomalies are listed in a result.
    pub const ALL: [&str; 18] = [
        LOST,
        LOST_ON_NODE,
        INCONSISTENT_OFFSET,
        DUPLICATE,
        READ_OF_FAILED,
        PHANTOM,
        ACK_MISMATCH,
        RESEND_MISMATCH,
        HOLE,
        OVER_TRIMMED,
        REGRESSED_READ,
        SUBSCRIBER_SKIP,
        SUBSCRIBER_REPEAT,
        REAL_TIME_ORDER,
        UNCONVERGED,
        FINAL_SEND_FAILED,
        UNAVAILABLE,
        UNCLEAN_STOP,
    ];
}

/// One broken promise, with the ops that prove it.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    /// One of [`kinds::ALL`].
    pub kind: &'static str,
    pub explanation: String,
    /// The ops (serialized [`Op`]s) that prove it, as few as possible. Long `messages` lists
    /// of reads are cut to the entries around the point of interest; such an op's value then
    /// carries `messages_total` (the full length) and `messages_first_position` (0-based
    /// position of the first entry kept).
    pub witness: Vec<Value>,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    Valid,
    Invalid,
    /// Nothing broke, but not everything could be checked: no ok send, no final read, a
    /// final read that failed or is missing, or a cluster that did not recover (see the
    /// module documentation).
    Unknown,
}

/// Counts over the history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// `send` invokes (every attempt, including retries after `info`).
    pub sends_invoked: u64,
    pub sends_ok: u64,
    pub sends_fail: u64,
    /// `send`s completed `info`, plus `send` invokes that never completed.
    pub sends_info: u64,
    /// `resend` operations (dedup probes).
    pub resends: u64,
    /// ok `read`s.
    pub reads: u64,
    /// ok `deliver`s.
    pub deliveries: u64,
    /// Nemesis invokes (faults and heals).
    pub nemesis_ops: u64,
    /// ok `final-read`s.
    pub final_reads: u64,
    /// `final-read`s completed `fail` or `info`, or never completed.
    pub final_reads_failed: u64,
    pub final_sends_ok: u64,
    /// `final-send`s completed `fail` or `info`, or never completed.
    pub final_sends_failed: u64,
    /// Acked texts that no final read holds because every node's retention had deleted
    /// them (their offset is below the earliest of every final read).
    pub acked_trimmed: u64,
    /// Resends of a key stored again more than the retention's count of messages after it:
    /// the first may have been trimmed, with its dedup record.
    pub rewritten_after_trim: u64,
    /// `move-with-voter-down` faults whose shard's sends were checked for availability.
    pub availability_windows: u64,
    /// The longest any send checked for availability waited, in milliseconds.
    pub availability_longest_wait_ms: u64,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub valid: Validity,
    pub anomalies: Vec<Anomaly>,
    pub stats: Stats,
    /// What limited the check (why a result is unknown, malformed ops that were skipped).
    pub notes: Vec<String>,
}

impl CheckResult {
    /// The JSON written to `results.json`: `valid` ("valid", "invalid" or "unknown"),
    /// `anomaly_count`, `anomaly_counts` (per kind), `anomalies`, `stats` and `notes`.
    pub fn to_json(&self) -> Value {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for a in &self.anomalies {
            *counts.entry(a.kind).or_default() += 1;
        }
        json!({
            "valid": self.valid,
            "anomaly_count": self.anomalies.len(),
            "anomaly_counts": counts,
            "anomalies": self.anomalies,
            "stats": self.stats,
            "notes": self.notes,
        })
    }
}

/// Checks a history; see the module documentation for what is checked.
pub fn check(history: &[Op]) -> CheckResult {
    let mut c = Checker::new(history);
    c.pair();
    c.index_sends();
    c.scan();
    c.resend_mismatches();
    c.ack_checks();
    c.lost();
    c.unread();
    c.recovery();
    c.unconverged();
    c.regressed_reads();
    c.final_sends();
    c.real_time_order();
    c.availability();
    c.clean_stops();
    c.finish()
}

// ---------------------------------------------------------------------------------------------

type ConvId = u32;
type TextId = u32;
/// The node a read was served by, when the history says.
type Node = Option<u64>;
/// A read on a node: its invoke's and its completion's positions, and the offset it ends at.
type NodeRead = (usize, usize, u64);

/// `unavailable`: the longest a send may wait while its shard keeps a majority (nanoseconds).
/// An election after a leader change takes 1–2 s in the runs' clusters; a move's promotion
/// and removal are single commits.
const STALL_LIMIT_NS: u64 = 5_000_000_000;
/// `unavailable`: sends invoked this soon after the fault's invoke are not checked (the
/// follower was killed just before; a client whose connection went with it reconnects).
const STALL_GRACE_NS: u64 = 1_000_000_000;

/// Entries kept on each side of the point of interest when a witness read is cut.
const WINDOW: usize = 2;
/// Placeholder in the position → client-op table.
const NO_COP: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fail,
    Info,
    /// Invoked, never completed (the history ends, or the process invoked again).
    Missing,
}

/// A client operation: an invoke and its completion, either of which may be absent.
#[derive(Debug)]
struct ClientOp {
    f: F,
    invoke: Option<usize>,
    done: Option<usize>,
    outcome: Outcome,
}

impl ClientOp {
    /// A field of the value, from the completion if it has it, else from the invoke.
    fn field<'h>(&self, h: &'h [Op], key: &str) -> Option<&'h Value> {
        self.done.and_then(|d| h[d].value.get(key)).or_else(|| self.invoke.and_then(|i| h[i].value.get(key)))
    }

    fn node(&self, h: &[Op]) -> Node {
        self.done.and_then(|d| h[d].node).or_else(|| self.invoke.and_then(|i| h[i].node))
    }
}

/// An ok send, resend or final-send.
#[derive(Debug, Clone, Copy)]
struct Ack {
    cop: usize,
    conv: ConvId,
    offset: u64,
    text: TextId,
}

#[derive(Debug, Default)]
struct TextInfo {
    /// Some send/resend/final-send carried it.
    carried: bool,
    /// Some op carrying it completed ok or info, or never completed.
    maybe_applied: bool,
    /// The first op carrying it that completed `fail`.
    failed_cop: Option<usize>,
    /// Earliest invoke position among the sends and final-sends carrying it.
    first_invoke: Option<usize>,
    /// Indices into `acks`.
    acks: Vec<usize>,
    /// Distinct places where reads and deliveries saw it: (conversation, offset, position of
    /// the first op that showed it there).
    places: Vec<(ConvId, u64, usize)>,
    phantom_reported: bool,
    failed_reported: bool,
}

impl TextInfo {
    fn definitely_failed(&self) -> bool {
        self.carried && !self.maybe_applied && self.failed_cop.is_some()
    }
}

#[derive(Debug)]
struct FinalRead {
    pos: usize,
    entries: Vec<(u64, TextId)>,
    /// The earliest offset the node kept (1 unless it said `truncated_before`).
    earliest: u64,
}

impl FinalRead {
    fn head(&self) -> u64 {
        self.entries.iter().map(|e| e.0).max().unwrap_or(0)
    }

    fn text_at(&self, offset: u64) -> Option<TextId> {
        self.entries.iter().find(|e| e.0 == offset).map(|e| e.1)
    }
}

#[derive(Debug, Default)]
struct Subscriber {
    /// The offset the next delivery must have.
    next: Option<u64>,
    /// The last delivered offset and the position of its deliver op.
    last: Option<(u64, usize)>,
    /// Position of the op `next` was derived from (the last deliver or subscribe, or a
    /// `caught-up` that moved it).
    anchor: usize,
    /// Position of a `caught-up` not yet followed by a delivery: the next delivery crosses
    /// the catch-up → live seam.
    seam: Option<usize>,
}

/// The messages a run's retention keeps per conversation, from its `retention` op.
fn retention_of(h: &[Op]) -> Option<u64> {
    h.iter().find(|o| o.f == F::Retention).and_then(|o| o.value.get("max_messages")).and_then(Value::as_u64)
}

#[derive(Debug, Default)]
struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    fn id(&mut self, s: &str) -> (u32, bool) {
        if let Some(&i) = self.ids.get(s) {
            return (i, false);
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 distinct names in one history");
        self.names.push(s.to_owned());
        self.ids.insert(s.to_owned(), i);
        (i, true)
    }

    fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }
}

/// A JSON value as a map key: strings as themselves, anything else (but null) as JSON text.
fn key(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Null => None,
        other => Some(Cow::Owned(other.to_string())),
    }
}

/// One `[offset, text]` entry of a read.
fn entry(v: &Value) -> Option<(u64, Cow<'_, str>)> {
    match v.as_array().map(Vec::as_slice) {
        Some([o, t]) => Some((o.as_u64()?, key(t)?)),
        _ => None,
    }
}

fn is_send(f: &F) -> bool {
    matches!(f, F::Send | F::Resend | F::FinalSend)
}

fn node_name(n: Node) -> String {
    n.map_or_else(|| "<unknown node>".to_string(), |n| format!("node {n}"))
}

fn read_name(f: &F) -> &'static str {
    if *f == F::FinalRead {
        "final read"
    } else {
        "read"
    }
}

fn process_name(p: Process) -> String {
    match p {
        Process::Client(n) => format!("process {n}"),
        Process::Nemesis(_) => "the nemesis".to_string(),
    }
}

/// Where to cut a witness read's messages.
#[derive(Debug, Clone, Copy)]
enum Focus {
    /// Keep everything.
    Whole,
    /// Around the first entry whose offset is ≥ this (the end if none).
    Offset(u64),
    /// Around this 0-based position.
    Position(usize),
}

/// Builds a witness: ops by history position, each with the range of messages to keep.
struct Witness<'h> {
    h: &'h [Op],
    ops: Vec<(usize, Option<(usize, usize)>)>,
}

impl<'h> Witness<'h> {
    fn new(h: &'h [Op]) -> Self {
        Witness { h, ops: Vec::new() }
    }

    fn op(self, pos: usize) -> Self {
        self.focus(pos, Focus::Whole)
    }

    fn near(self, pos: usize, offset: u64) -> Self {
        self.focus(pos, Focus::Offset(offset))
    }

    fn focus(mut self, pos: usize, focus: Focus) -> Self {
        let msgs = self.h[pos].value.get("messages").and_then(Value::as_array);
        let range = match (msgs, focus) {
            (None, _) | (_, Focus::Whole) => None,
            (Some(m), Focus::Offset(o)) => {
                let at = m.iter().position(|e| entry(e).is_some_and(|(eo, _)| eo >= o));
                Some(window(at.unwrap_or(m.len().saturating_sub(1)), m.len()))
            }
            (Some(m), Focus::Position(p)) => Some(window(p, m.len())),
        };
        match self.ops.iter_mut().find(|(p, _)| *p == pos) {
            Some((_, r)) => {
                *r = match (*r, range) {
                    (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                    _ => None,
                }
            }
            None => self.ops.push((pos, range)),
        }
        self
    }

    /// The completion of a client op (with its invoke too when the completion alone does not
    /// say what was sent).
    fn cop(self, c: &ClientOp) -> Self {
        let h = self.h;
        match c.done {
            Some(d) if h[d].value.get("text").is_some() && h[d].value.get("conversation").is_some() => self.op(d),
            _ => {
                let w = match c.invoke {
                    Some(i) => self.op(i),
                    None => self,
                };
                match c.done {
                    Some(d) => w.op(d),
                    None => w,
                }
            }
        }
    }

    /// Invoke and completion of a client op.
    fn both(self, c: &ClientOp) -> Self {
        let w = match c.invoke {
            Some(i) => self.op(i),
            None => self,
        };
        match c.done {
            Some(d) => w.op(d),
            None => w,
        }
    }

    fn anomaly(self, kind: &'static str, mut explanation: String) -> Anomaly {
        let mut cut = false;
        let witness = self
            .ops
            .iter()
            .map(|&(pos, range)| {
                let (v, was_cut) = render(&self.h[pos], range);
                cut |= was_cut;
                v
            })
            .collect();
        if cut {
            explanation.push_str(
                " (long message lists in the witness are cut to the entries around the point of interest; \
                 messages_total gives the full length)",
            );
        }
        Anomaly { kind, explanation, witness }
    }
}

fn window(center: usize, len: usize) -> (usize, usize) {
    (center.saturating_sub(WINDOW), (center + WINDOW + 1).min(len))
}

/// An op as JSON, its messages cut to `range` (positions `[lo, hi)`) when that drops any.
fn render(op: &Op, range: Option<(usize, usize)>) -> (Value, bool) {
    let msgs = op.value.get("messages").and_then(Value::as_array);
    let (value, cut) = match (range, msgs, op.value.as_object()) {
        (Some((lo, hi)), Some(m), Some(obj)) if lo > 0 || hi < m.len() => {
            let mut out = Map::new();
            for (k, v) in obj {
                if k != "messages" {
                    out.insert(k.clone(), v.clone());
                }
            }
            out.insert("messages".into(), Value::Array(m[lo.min(m.len())..hi.min(m.len())].to_vec()));
            out.insert("messages_total".into(), json!(m.len()));
            out.insert("messages_first_position".into(), json!(lo));
            (Value::Object(out), true)
        }
        _ => (op.value.clone(), false),
    };
    let shown = Op {
        index: op.index,
        time: op.time,
        kind: op.kind,
        process: op.process,
        f: op.f.clone(),
        value,
        node: op.node,
    };
    (serde_json::to_value(&shown).expect("history ops serialize"), cut)
}

struct Checker<'h> {
    h: &'h [Op],
    stats: Stats,
    anomalies: Vec<Anomaly>,
    notes: Vec<String>,
    convs: Interner,
    text_names: Interner,
    texts: Vec<TextInfo>,
    cops: Vec<ClientOp>,
    /// History position of a completion → its client op.
    cop_at: Vec<u32>,
    acks: Vec<Ack>,
    /// Ack index of each client op that is an ack.
    ack_of_cop: HashMap<usize, usize>,
    /// First observation of each (conversation, offset): the text and the op's position.
    slots: HashMap<(ConvId, u64), (TextId, usize)>,
    slot_conflicts: HashSet<(ConvId, u64, TextId)>,
    holes: HashSet<(Node, ConvId, u64)>,
    subscribers: HashMap<(Process, ConvId), Subscriber>,
    /// The last ok final read of each conversation on each node.
    finals: BTreeMap<ConvId, BTreeMap<Node, FinalRead>>,
    /// Every ok, dense read of each conversation on each named node (`regressed-read`).
    node_reads: HashMap<(u64, ConvId), Vec<NodeRead>>,
    /// Resend acks already reported as `resend-mismatch`.
    mismatched_resends: HashSet<usize>,
    /// Malformed ops, by what was wrong, for the notes.
    malformed: BTreeMap<&'static str, (u64, u64)>,
    deliveries_without_subscribe: u64,
    /// Conversations with acked sends and no final read on any node.
    unchecked: usize,
    /// (node, conversation) pairs without an ok final read, or with a failed one.
    unread: usize,
    /// `recover` ops that did not complete `recovered`.
    not_recovered: usize,
    /// Final sends that failed while a majority of nodes refused to start after damage.
    refused_liveness: usize,
    /// Messages the run's retention keeps per conversation, if it has one.
    retention: Option<u64>,
}

impl<'h> Checker<'h> {
    fn new(h: &'h [Op]) -> Self {
        Checker {
            h,
            stats: Stats::default(),
            anomalies: Vec::new(),
            notes: Vec::new(),
            convs: Interner::default(),
            text_names: Interner::default(),
            texts: Vec::new(),
            cops: Vec::new(),
            cop_at: vec![NO_COP; h.len()],
            acks: Vec::new(),
            ack_of_cop: HashMap::new(),
            slots: HashMap::new(),
            slot_conflicts: HashSet::new(),
            holes: HashSet::new(),
            subscribers: HashMap::new(),
            finals: BTreeMap::new(),
            node_reads: HashMap::new(),
            mismatched_resends: HashSet::new(),
            malformed: BTreeMap::new(),
            deliveries_without_subscribe: 0,
            unchecked: 0,
            unread: 0,
            not_recovered: 0,
            refused_liveness: 0,
            retention: retention_of(h),
        }
    }

    /// Whether a text at (`c1`, `o1`) and again at (`c2`, `o2`) may be a key stored again
    /// after retention trimmed its first place with its dedup record (see the module doc).
    fn beyond_retention(&self, (c1, o1): (ConvId, u64), (c2, o2): (ConvId, u64)) -> bool {
        self.retention.is_some_and(|n| c1 == c2 && o1.abs_diff(o2) > n)
    }

    fn malformed(&mut self, what: &'static str, pos: usize) {
        let index = self.h[pos].index;
        self.malformed.entry(what).and_modify(|e| e.0 += 1).or_insert((1, index));
    }

    fn conv_id(&mut self, name: &str) -> ConvId {
        self.convs.id(name).0
    }

    fn text_id(&mut self, name: &str) -> TextId {
        let (id, new) = self.text_names.id(name);
        if new {
            self.texts.push(TextInfo::default());
        }
        id
    }

    fn text(&self, t: TextId) -> &str {
        self.text_names.name(t)
    }

    fn conv(&self, c: ConvId) -> &str {
        self.convs.name(c)
    }

    fn index(&self, pos: usize) -> u64 {
        self.h[pos].index
    }

    fn push(&mut self, a: Anomaly) {
        self.anomalies.push(a);
    }

    fn add_cop(&mut self, f: F, invoke: Option<usize>, done: Option<usize>, outcome: Outcome) {
        let i = u32::try_from(self.cops.len()).expect("fewer than 2^32 operations in one history");
        if let Some(d) = done {
            self.cop_at[d] = i;
        }
        self.cops.push(ClientOp { f, invoke, done, outcome });
    }

    /// Pairs every client completion with the latest invoke of its process.
    fn pair(&mut self) {
        let h = self.h;
        let mut pending: HashMap<Process, usize> = HashMap::new();
        for (pos, op) in h.iter().enumerate() {
            if let Process::Nemesis(_) = op.process {
                if op.kind == Type::Invoke {
                    self.stats.nemesis_ops += 1;
                }
                continue;
            }
            if !matches!(op.f, F::Send | F::Resend | F::Read | F::FinalRead | F::FinalSend) {
                continue;
            }
            let outcome = match op.kind {
                Type::Invoke => {
                    if let Some(prev) = pending.insert(op.process, pos) {
                        self.add_cop(h[prev].f.clone(), Some(prev), None, Outcome::Missing);
                    }
                    continue;
                }
                Type::Ok => Outcome::Ok,
                Type::Fail => Outcome::Fail,
                Type::Info => Outcome::Info,
            };
            let invoke = match pending.remove(&op.process) {
                Some(i) if h[i].f == op.f => Some(i),
                Some(i) => {
                    self.malformed("completions whose f differs from the pending invoke of their process", pos);
                    self.add_cop(h[i].f.clone(), Some(i), None, Outcome::Missing);
                    None
                }
                None => {
                    self.malformed("completions without an invoke", pos);
                    None
                }
            };
            self.add_cop(op.f.clone(), invoke, Some(pos), outcome);
        }
        let mut left: Vec<usize> = pending.into_values().collect();
        left.sort_unstable();
        for i in left {
            self.add_cop(h[i].f.clone(), Some(i), None, Outcome::Missing);
        }
    }

    /// Indexes every send, resend and final-send by its text; collects the acks.
    fn index_sends(&mut self) {
        let h = self.h;
        for ci in 0..self.cops.len() {
            let (f, outcome, invoke) = {
                let c = &self.cops[ci];
                (c.f.clone(), c.outcome, c.invoke)
            };
            match (&f, outcome) {
                (F::Send, o) => {
                    self.stats.sends_invoked += u64::from(invoke.is_some());
                    match o {
                        Outcome::Ok => self.stats.sends_ok += 1,
                        Outcome::Fail => self.stats.sends_fail += 1,
                        Outcome::Info | Outcome::Missing => self.stats.sends_info += 1,
                    }
                }
                (F::Resend, _) => self.stats.resends += 1,
                (F::FinalSend, Outcome::Ok) => self.stats.final_sends_ok += 1,
                (F::FinalSend, _) => self.stats.final_sends_failed += 1,
                (F::Read, Outcome::Ok) => self.stats.reads += 1,
                (F::FinalRead, Outcome::Ok) => self.stats.final_reads += 1,
                (F::FinalRead, _) => self.stats.final_reads_failed += 1,
                _ => {}
            }
            if !is_send(&f) {
                continue;
            }
            let c = &self.cops[ci];
            let text = c.field(h, "text").and_then(key);
            let conv = c.field(h, "conversation").and_then(key);
            let offset = c.done.and_then(|d| h[d].value.get("offset")).and_then(Value::as_u64);
            let some_pos = c.done.or(c.invoke).unwrap_or(0);
            let Some(text) = text else {
                self.malformed("sends without a text", some_pos);
                continue;
            };
            let tid = self.text_id(&text);
            let t = &mut self.texts[tid as usize];
            t.carried = true;
            match outcome {
                Outcome::Fail => {
                    t.failed_cop.get_or_insert(ci);
                }
                Outcome::Ok | Outcome::Info | Outcome::Missing => t.maybe_applied = true,
            }
            if f != F::Resend {
                if let Some(i) = invoke {
                    t.first_invoke = Some(t.first_invoke.map_or(i, |fi| fi.min(i)));
                }
            }
            if outcome != Outcome::Ok {
                continue;
            }
            match (conv, offset) {
                (Some(conv), Some(offset)) => {
                    let conv = self.conv_id(&conv);
                    let ai = self.acks.len();
                    self.acks.push(Ack { cop: ci, conv, offset, text: tid });
                    self.ack_of_cop.insert(ci, ai);
                    self.texts[tid as usize].acks.push(ai);
                }
                _ => self.malformed("ok sends without a conversation or an offset", some_pos),
            }
        }
    }

    /// Walks the history in order: reads, deliveries, subscriptions and acks.
    fn scan(&mut self) {
        let h = self.h;
        for (pos, op) in h.iter().enumerate() {
            match (&op.f, op.kind) {
                (F::Deliver, Type::Ok) => {
                    self.stats.deliveries += 1;
                    self.on_deliver(pos);
                    continue;
                }
                (F::Subscribe, Type::Ok) => {
                    self.on_subscribe(pos);
                    continue;
                }
                (F::CaughtUp, Type::Ok) => {
                    self.on_caught_up(pos);
                    continue;
                }
                (F::Truncated, Type::Ok) => {
                    self.on_truncated(pos);
                    continue;
                }
                _ => {}
            }
            let ci = self.cop_at[pos];
            if ci == NO_COP {
                continue;
            }
            let ci = ci as usize;
            let ok = self.cops[ci].outcome == Outcome::Ok;
            match self.cops[ci].f {
                // What a failed read received before its error is still what the node sent.
                F::Read | F::FinalRead if ok || op.value.get("messages").is_some() => self.on_read(ci, pos, ok),
                _ if !ok => {}
                _ => {
                    if let Some(&ai) = self.ack_of_cop.get(&ci) {
                        let a = self.acks[ai];
                        self.observe_slot(a.conv, a.offset, a.text, pos);
                    }
                }
            }
        }
    }

    /// Any observation of `text` at (`conv`, `offset`), acks included.
    fn observe_slot(&mut self, conv: ConvId, offset: u64, text: TextId, pos: usize) {
        let (first_text, first_pos) = match self.slots.entry((conv, offset)) {
            Entry::Vacant(e) => {
                e.insert((text, pos));
                return;
            }
            Entry::Occupied(e) => *e.get(),
        };
        if first_text == text || !self.slot_conflicts.insert((conv, offset, text)) {
            return;
        }
        let explanation = format!(
            "offset {offset} of conversation {:?} holds {:?} in op {} but {:?} in op {}",
            self.conv(conv),
            self.text(first_text),
            self.index(first_pos),
            self.text(text),
            self.index(pos)
        );
        let a = Witness::new(self.h)
            .near(first_pos, offset)
            .near(pos, offset)
            .anomaly(kinds::INCONSISTENT_OFFSET, explanation);
        self.push(a);
    }

    /// An observation by a read, final read or delivery (not an ack).
    fn observe_text(&mut self, conv: ConvId, offset: u64, text: TextId, pos: usize) {
        let t = &mut self.texts[text as usize];
        let mut duplicate_of = None;
        if !t.places.iter().any(|&(c, o, _)| c == conv && o == offset) {
            duplicate_of = t.places.first().copied();
            t.places.push((conv, offset, pos));
        }
        let phantom = !t.carried && !t.phantom_reported;
        t.phantom_reported |= phantom;
        let failed = t.definitely_failed() && !t.failed_reported;
        t.failed_reported |= failed;
        let failed_cop = t.failed_cop;
        if let Some((c0, o0, p0)) = duplicate_of.filter(|&(c0, o0, _)| !self.beyond_retention((c0, o0), (conv, offset)))
        {
            let explanation = format!(
                "{:?} is at offset {o0} of conversation {:?} in op {} and at offset {offset} of conversation {:?} in op {}",
                self.text(text),
                self.conv(c0),
                self.index(p0),
                self.conv(conv),
                self.index(pos)
            );
            let a = Witness::new(self.h).near(p0, o0).near(pos, offset).anomaly(kinds::DUPLICATE, explanation);
            self.push(a);
        }
        if phantom {
            let explanation = format!(
                "op {} shows {:?} at offset {offset} of conversation {:?}, but no send ever carried that text",
                self.index(pos),
                self.text(text),
                self.conv(conv)
            );
            let a = Witness::new(self.h).near(pos, offset).anomaly(kinds::PHANTOM, explanation);
            self.push(a);
        }
        if let (true, Some(fc)) = (failed, failed_cop) {
            let c = &self.cops[fc];
            let explanation = format!(
                "op {} shows {:?} at offset {offset} of conversation {:?}, but every send carrying it failed \
                 (definitely not applied), e.g. op {}",
                self.index(pos),
                self.text(text),
                self.conv(conv),
                self.index(c.done.or(c.invoke).unwrap_or(pos))
            );
            let a = Witness::new(self.h).cop(c).near(pos, offset).anomaly(kinds::READ_OF_FAILED, explanation);
            self.push(a);
        }
    }

    /// A read's messages; `complete`: it completed ok (a failed read's are a prefix, and
    /// never a node's final state).
    fn on_read(&mut self, ci: usize, pos: usize, complete: bool) {
        let h = self.h;
        let (conv, node, is_final) = {
            let c = &self.cops[ci];
            (c.field(h, "conversation").and_then(key), c.node(h), complete && c.f == F::FinalRead)
        };
        let Some(conv) = conv else {
            self.malformed("reads without a conversation", pos);
            return;
        };
        let conv = self.conv_id(&conv);
        let Some(msgs) = h[pos].value.get("messages").and_then(Value::as_array) else {
            self.malformed("reads without a messages list", pos);
            return;
        };
        let truncated = h[pos].value.get("truncated_before").and_then(Value::as_u64);
        let earliest = truncated.unwrap_or(1).max(1);
        if let (Some(e), Some(keep), true) = (truncated, self.retention, complete) {
            if (msgs.len() as u64) < keep {
                let explanation = format!(
                    "{} {} of conversation {:?} on {} says retention deleted the messages before offset {e}, but                      holds {} message(s): the retention keeps {keep}",
                    if h[pos].f == F::FinalRead { "final read" } else { "read" },
                    self.index(pos),
                    self.conv(conv),
                    node_name(node),
                    msgs.len()
                );
                let a = Witness::new(h).op(pos).anomaly(kinds::OVER_TRIMMED, explanation);
                self.push(a);
            }
        }
        let mut hole_seen = false;
        let mut entries = Vec::with_capacity(if is_final { msgs.len() } else { 0 });
        for (i, m) in msgs.iter().enumerate() {
            let parsed = entry(m);
            let expected = earliest + i as u64;
            if !hole_seen && parsed.as_ref().map(|p| p.0) != Some(expected) {
                hole_seen = true;
                self.hole(pos, conv, node, i, earliest, parsed.as_ref().map(|p| p.0));
            }
            let Some((offset, text)) = parsed else { continue };
            let tid = self.text_id(&text);
            self.observe_slot(conv, offset, tid, pos);
            self.observe_text(conv, offset, tid, pos);
            if is_final {
                entries.push((offset, tid));
            }
        }
        if let (true, false, Some(n), Some(invoke)) = (complete, hole_seen, node, self.cops[ci].invoke) {
            let head = earliest - 1 + msgs.len() as u64;
            self.node_reads.entry((n, conv)).or_default().push((invoke, pos, head));
        }
        if is_final {
            self.finals.entry(conv).or_default().insert(node, FinalRead { pos, entries, earliest });
        }
    }

    fn hole(&mut self, pos: usize, conv: ConvId, node: Node, position: usize, earliest: u64, found: Option<u64>) {
        let expected = earliest + position as u64;
        if !self.holes.insert((node, conv, expected)) {
            return;
        }
        let later = self.h[pos]
            .value
            .get("messages")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().skip(position).any(|e| entry(e).is_some_and(|(o, _)| o == expected)));
        let what = match found {
            Some(o) if o > expected && !later => {
                format!("offset {expected} is missing (the entry there is offset {o})")
            }
            Some(o) => format!("entry {position} is offset {o}, out of order (expected {expected})"),
            None => format!("entry {position} is not an [offset, text] pair (expected offset {expected})"),
        };
        let explanation = format!(
            "{}{} {} of conversation {:?} on {}: {what}; messages must be exactly offsets {earliest}..=n in order",
            if self.h[pos].kind == Type::Ok { "" } else { "failed " },
            if self.h[pos].f == F::FinalRead { "final read" } else { "read" },
            self.index(pos),
            self.conv(conv),
            node_name(node)
        );
        let a = Witness::new(self.h).focus(pos, Focus::Position(position)).anomaly(kinds::HOLE, explanation);
        self.push(a);
    }

    fn on_subscribe(&mut self, pos: usize) {
        let op = &self.h[pos];
        let (Some(conv), Some(from)) =
            (op.value.get("conversation").and_then(key), op.value.get("from").and_then(Value::as_u64))
        else {
            self.malformed("subscribes without a conversation or from", pos);
            return;
        };
        let conv = self.conv_id(&conv);
        let sub = self.subscribers.entry((op.process, conv)).or_default();
        let last = sub.last;
        sub.next = Some(from);
        sub.anchor = pos;
        sub.seam = None;
        if let Some((l, lpos)) = last {
            if from != l + 1 {
                let kind = if from > l + 1 { kinds::SUBSCRIBER_SKIP } else { kinds::SUBSCRIBER_REPEAT };
                let explanation = format!(
                    "{} resumed conversation {:?} from offset {from} (op {}) but its last delivery was offset {l} \
                     (op {}): expected from {}",
                    process_name(op.process),
                    self.conv(conv),
                    op.index,
                    self.index(lpos),
                    l + 1
                );
                let a = Witness::new(self.h).op(lpos).op(pos).anomaly(kind, explanation);
                self.push(a);
            }
        }
    }

    fn on_deliver(&mut self, pos: usize) {
        let op = &self.h[pos];
        let v = &op.value;
        let (Some(conv), Some(offset), Some(text)) =
            (v.get("conversation").and_then(key), v.get("offset").and_then(Value::as_u64), v.get("text").and_then(key))
        else {
            self.malformed("deliveries without a conversation, offset or text", pos);
            return;
        };
        let conv = self.conv_id(&conv);
        let tid = self.text_id(&text);
        self.observe_slot(conv, offset, tid, pos);
        self.observe_text(conv, offset, tid, pos);
        let sub = self.subscribers.entry((op.process, conv)).or_default();
        let (next, anchor, seam) = (sub.next, sub.anchor, sub.seam.take());
        sub.next = Some(offset + 1);
        sub.last = Some((offset, pos));
        sub.anchor = pos;
        let Some(next) = next else {
            self.deliveries_without_subscribe += 1;
            return;
        };
        if offset == next {
            return;
        }
        let kind = if offset > next { kinds::SUBSCRIBER_SKIP } else { kinds::SUBSCRIBER_REPEAT };
        let previous = match self.h[anchor].f {
            F::Subscribe => format!("subscribed from offset {next}"),
            F::CaughtUp => format!("told it was caught up at head {}", next - 1),
            _ => format!("after delivering offset {}", next - 1),
        };
        let at_seam = seam.map_or_else(String::new, |p| {
            let head = self.h[p].value.get("head").and_then(Value::as_u64).unwrap_or(0);
            format!(", at the catch-up → live seam (caught up at head {head} in op {})", self.index(p))
        });
        let explanation = format!(
            "{} got offset {offset} of conversation {:?} (op {}) but expected {next} ({previous} in op {}){at_seam}",
            process_name(op.process),
            self.conv(conv),
            op.index,
            self.index(anchor)
        );
        let mut w = Witness::new(self.h).op(anchor);
        if let Some(p) = seam {
            w = w.op(p);
        }
        let a = w.op(pos).anomaly(kind, explanation);
        self.push(a);
    }

    /// The node told a subscriber that retention deleted the messages before `earliest`: its
    /// stream goes on from there, on purpose.
    fn on_truncated(&mut self, pos: usize) {
        let op = &self.h[pos];
        let (Some(conv), Some(earliest)) =
            (op.value.get("conversation").and_then(key), op.value.get("earliest").and_then(Value::as_u64))
        else {
            self.malformed("truncations without a conversation or earliest", pos);
            return;
        };
        let conv = self.conv_id(&conv);
        let sub = self.subscribers.entry((op.process, conv)).or_default();
        if sub.next.is_some_and(|n| n < earliest) {
            sub.next = Some(earliest);
            sub.last = Some((earliest - 1, pos));
            sub.anchor = pos;
        }
    }

    /// The node told a subscriber it had sent everything stored up to `head`; live push
    /// follows. A head past what the subscriber got means the catch-up skipped the rest.
    fn on_caught_up(&mut self, pos: usize) {
        let op = &self.h[pos];
        let (Some(conv), Some(head)) =
            (op.value.get("conversation").and_then(key), op.value.get("head").and_then(Value::as_u64))
        else {
            self.malformed("caught-ups without a conversation or head", pos);
            return;
        };
        let conv = self.conv_id(&conv);
        let sub = self.subscribers.entry((op.process, conv)).or_default();
        sub.seam = Some(pos);
        let (Some(next), anchor) = (sub.next, sub.anchor) else { return };
        if head < next {
            return;
        }
        // One report: from here on the stream is where the node says it is.
        sub.next = Some(head + 1);
        sub.anchor = pos;
        let previous = match self.h[anchor].f {
            F::Subscribe => format!("it subscribed from offset {next}"),
            F::CaughtUp => format!("it was told it was caught up at head {}", next - 1),
            _ => format!("its last delivery was offset {}", next - 1),
        };
        let explanation = format!(
            "{} was told conversation {:?} is caught up at head {head} (op {}) but {previous} (op {}): offsets \
             {next}..={head} were skipped at the catch-up → live seam",
            process_name(op.process),
            self.conv(conv),
            op.index,
            self.index(anchor)
        );
        let a = Witness::new(self.h).op(anchor).op(pos).anomaly(kinds::SUBSCRIBER_SKIP, explanation);
        self.push(a);
    }

    fn client_key(&self, c: &ClientOp) -> Option<(String, String)> {
        let id = c.field(self.h, "client_id").and_then(key)?;
        let seq = c.field(self.h, "client_seq").and_then(key)?;
        Some((id.into_owned(), seq.into_owned()))
    }

    /// A resend must be acked with the original send's place.
    fn resend_mismatches(&mut self) {
        let mut originals: HashMap<(String, String), usize> = HashMap::new();
        for (ai, a) in self.acks.iter().enumerate() {
            let c = &self.cops[a.cop];
            if c.f != F::Resend {
                if let Some(k) = self.client_key(c) {
                    originals.entry(k).or_insert(ai);
                }
            }
        }
        let mut found = Vec::new();
        for (ai, a) in self.acks.iter().enumerate() {
            let c = &self.cops[a.cop];
            if c.f != F::Resend {
                continue;
            }
            let Some(&oi) = self.client_key(c).and_then(|k| originals.get(&k)) else { continue };
            let o = &self.acks[oi];
            if (o.conv, o.offset) != (a.conv, a.offset) {
                if self.beyond_retention((o.conv, o.offset), (a.conv, a.offset)) {
                    self.stats.rewritten_after_trim += 1;
                } else {
                    found.push((oi, ai));
                }
            }
        }
        for (oi, ai) in found {
            self.mismatched_resends.insert(ai);
            let (o, a) = (self.acks[oi], self.acks[ai]);
            let explanation = format!(
                "{:?} (same client_id and client_seq) was acked at offset {} of conversation {:?} (op {}) but the \
                 resend was acked at offset {} of conversation {:?} (op {})",
                self.text(a.text),
                o.offset,
                self.conv(o.conv),
                self.index(self.cops[o.cop].done.unwrap_or(0)),
                a.offset,
                self.conv(a.conv),
                self.index(self.cops[a.cop].done.unwrap_or(0))
            );
            let w = Witness::new(self.h).cop(&self.cops[o.cop]).cop(&self.cops[a.cop]);
            self.anomalies.push(w.anomaly(kinds::RESEND_MISMATCH, explanation));
        }
    }

    /// Acks against each other (`duplicate`) and against reads and deliveries (`ack-mismatch`).
    fn ack_checks(&mut self) {
        let mut found = Vec::new();
        for t in &self.texts {
            let acks: Vec<Ack> =
                t.acks.iter().filter(|ai| !self.mismatched_resends.contains(ai)).map(|&ai| self.acks[ai]).collect();
            let Some(&first) = acks.first() else { continue };
            if let Some(&other) = acks.iter().find(|a| {
                (a.conv, a.offset) != (first.conv, first.offset)
                    && !self.beyond_retention((first.conv, first.offset), (a.conv, a.offset))
            }) {
                found.push((kinds::DUPLICATE, first, other, None));
            }
            if t.places.is_empty() {
                continue;
            }
            // An acked place never observed is no mismatch when every place the text was seen
            // may be it stored again after retention trimmed the acked one.
            if let Some(&a) = acks.iter().find(|a| {
                !t.places.iter().any(|&(c, o, _)| (c, o) == (a.conv, a.offset))
                    && !t.places.iter().all(|&(c, o, _)| self.beyond_retention((a.conv, a.offset), (c, o)))
            }) {
                found.push((kinds::ACK_MISMATCH, a, a, t.places.first().copied()));
            }
        }
        for (kind, a, b, place) in found {
            let ack_index = |x: &Ack| self.index(self.cops[x.cop].done.unwrap_or(0));
            let (explanation, w) = match place {
                None => (
                    format!(
                        "{:?} was acked at offset {} of conversation {:?} (op {}) and at offset {} of conversation \
                         {:?} (op {})",
                        self.text(a.text),
                        a.offset,
                        self.conv(a.conv),
                        ack_index(&a),
                        b.offset,
                        self.conv(b.conv),
                        ack_index(&b)
                    ),
                    Witness::new(self.h).cop(&self.cops[a.cop]).cop(&self.cops[b.cop]),
                ),
                Some((c, o, p)) => (
                    format!(
                        "{:?} was acked at offset {} of conversation {:?} (op {}) but is observed at offset {o} of \
                         conversation {:?} (op {}) and never at the acked offset",
                        self.text(a.text),
                        a.offset,
                        self.conv(a.conv),
                        ack_index(&a),
                        self.conv(c),
                        self.index(p)
                    ),
                    Witness::new(self.h).cop(&self.cops[a.cop]).near(p, o),
                ),
            };
            let an = w.anomaly(kind, explanation);
            self.anomalies.push(an);
        }
    }

    /// Acked texts against the final reads.
    fn lost(&mut self) {
        let mut present: HashMap<(ConvId, Node), HashSet<TextId>> = HashMap::new();
        for (&conv, nodes) in &self.finals {
            for (&node, fr) in nodes {
                present.insert((conv, node), fr.entries.iter().map(|e| e.1).collect());
            }
        }
        let mut unchecked: BTreeMap<ConvId, u64> = BTreeMap::new();
        let mut lost = Vec::new();
        let mut on_node: BTreeMap<(ConvId, Node), Vec<Ack>> = BTreeMap::new();
        for t in &self.texts {
            // The ack that counts: the first non-resend one (a resend repeats it).
            let Some(&ai) = t.acks.iter().find(|&&ai| self.cops[self.acks[ai].cop].f != F::Resend).or(t.acks.first())
            else {
                continue;
            };
            let a = self.acks[ai];
            let Some(nodes) = self.finals.get(&a.conv).filter(|n| !n.is_empty()) else {
                *unchecked.entry(a.conv).or_default() += 1;
                continue;
            };
            // Below a node's earliest, the text is gone on purpose (retention).
            let missing: Vec<Node> = nodes
                .iter()
                .filter(|(&n, fr)| {
                    a.offset >= fr.earliest && !present.get(&(a.conv, n)).is_some_and(|s| s.contains(&a.text))
                })
                .map(|(&n, _)| n)
                .collect();
            let trimmed_everywhere = nodes.values().all(|fr| a.offset < fr.earliest);
            if trimmed_everywhere {
                self.stats.acked_trimmed += 1;
            } else if missing.len() == nodes.len() {
                lost.push(a);
            } else {
                for n in missing {
                    on_node.entry((a.conv, n)).or_default().push(a);
                }
            }
        }
        for a in lost {
            let nodes = &self.finals[&a.conv];
            let heads: Vec<String> =
                nodes.iter().map(|(&n, fr)| format!("{} head {}", node_name(n), fr.head())).collect();
            let explanation = format!(
                "{:?} was acked at offset {} of conversation {:?} (op {}) but is absent from the final read of every \
                 node ({})",
                self.text(a.text),
                a.offset,
                self.conv(a.conv),
                self.index(self.cops[a.cop].done.unwrap_or(0)),
                heads.join(", ")
            );
            let mut w = Witness::new(self.h).cop(&self.cops[a.cop]);
            for fr in nodes.values() {
                w = w.near(fr.pos, a.offset);
            }
            self.anomalies.push(w.anomaly(kinds::LOST, explanation));
        }
        for ((conv, node), mut acks) in on_node {
            acks.sort_by_key(|a| a.offset);
            let a = acks[0];
            let nodes = &self.finals[&conv];
            let fr = &nodes[&node];
            let head = fr.head();
            let why = if head < a.offset {
                format!("the node is behind: head {head} < {}", a.offset)
            } else {
                match fr.text_at(a.offset) {
                    Some(other) => format!("head {head}; offset {} holds {:?} there", a.offset, self.text(other)),
                    None => format!("head {head}; offset {} is missing there", a.offset),
                }
            };
            let elsewhere = nodes
                .iter()
                .find(|(n, _)| present.get(&(conv, **n)).is_some_and(|s| s.contains(&a.text)))
                .map(|(&n, fr)| (n, fr.pos));
            let explanation = format!(
                "{} acked message(s) of conversation {:?} are absent from the final read of {} (op {}) but present on \
                 another node; first: {:?} acked at offset {} (op {}), {}{}",
                acks.len(),
                self.conv(conv),
                node_name(node),
                self.index(fr.pos),
                self.text(a.text),
                a.offset,
                self.index(self.cops[a.cop].done.unwrap_or(0)),
                why,
                elsewhere.map(|(n, p)| format!("; {} has it (op {})", node_name(n), self.index(p))).unwrap_or_default()
            );
            let mut w = Witness::new(self.h).cop(&self.cops[a.cop]).near(fr.pos, a.offset);
            if let Some((_, p)) = elsewhere {
                w = w.near(p, a.offset);
            }
            self.anomalies.push(w.anomaly(kinds::LOST_ON_NODE, explanation));
        }
        if !unchecked.is_empty() {
            let list: Vec<String> = unchecked.iter().map(|(&c, n)| format!("{:?} ({n} acked)", self.conv(c))).collect();
            self.notes.push(format!(
                "no node has a final read of conversation(s) {}: their acked sends could not be checked for loss",
                list.join(", ")
            ));
        }
        self.unchecked = unchecked.len();
    }

    /// Every node the history names must have an ok final read of every conversation that
    /// must be read at the end (one with an ack or a final-read op), and no final read may
    /// have failed: else that node was not checked for loss or convergence.
    fn unread(&mut self) {
        let h = self.h;
        let nodes: BTreeSet<Node> =
            h.iter().filter(|o| matches!(o.process, Process::Client(_))).filter_map(|o| o.node).map(Some).collect();
        let mut convs: BTreeSet<ConvId> = self.acks.iter().map(|a| a.conv).collect();
        let mut failed: BTreeMap<(Node, ConvId), String> = BTreeMap::new();
        let mut final_reads = Vec::new();
        for c in self.cops.iter().filter(|c| c.f == F::FinalRead) {
            let Some(conv) = c.field(h, "conversation").and_then(key) else { continue };
            let how = match c.outcome {
                Outcome::Ok => None,
                Outcome::Missing => Some(format!("op {} never completed", self.index(c.invoke.unwrap_or(0)))),
                Outcome::Fail | Outcome::Info => {
                    let d = c.done.unwrap_or(0);
                    let error = h[d].value.get("error").map_or_else(|| "no error given".to_string(), Value::to_string);
                    Some(format!("op {} failed: {error}", self.index(d)))
                }
            };
            final_reads.push((conv.into_owned(), c.node(h), how));
        }
        for (conv, node, how) in final_reads {
            let conv = self.conv_id(&conv);
            convs.insert(conv);
            if let Some(how) = how {
                failed.entry((node, conv)).or_insert(how);
            }
        }
        // After moves (`membership`), a conversation is read at the end from the nodes that
        // hold its shard then, as the runner's `settle` recorded them; a node that holds none
        // has nothing to be checked for.
        let holders: BTreeMap<String, BTreeSet<u64>> = h
            .iter()
            .filter(|o| o.process == Process::NEMESIS && o.f == F::Settle && o.kind == Type::Info)
            .filter_map(|o| o.value.get("holders")?.as_object().cloned())
            .flat_map(|m| m.into_iter())
            .map(|(c, v)| (c, v.as_array().into_iter().flatten().filter_map(Value::as_u64).collect()))
            .collect();
        let mut by_node: BTreeMap<Node, Vec<String>> = BTreeMap::new();
        for &node in nodes.iter().chain(failed.keys().map(|(n, _)| n)).collect::<BTreeSet<_>>() {
            for &conv in &convs {
                let holds = match (node, holders.get(self.conv(conv))) {
                    (Some(n), Some(set)) => set.contains(&n),
                    _ => true,
                };
                if !holds && !failed.contains_key(&(node, conv)) {
                    continue;
                }
                let read_ok = self.finals.get(&conv).is_some_and(|f| f.contains_key(&node));
                let why = match failed.get(&(node, conv)) {
                    Some(how) => how.clone(),
                    None if read_ok => continue,
                    None => "no final read".to_string(),
                };
                by_node.entry(node).or_default().push(format!("{:?} ({why})", self.conv(conv)));
            }
        }
        for (node, list) in &by_node {
            let count = list.len();
            let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
            self.notes.push(format!(
                "{} was not read at the end for {count} of {} conversation(s), so it was not checked for loss or \
                 convergence there: {}{}",
                node_name(*node),
                convs.len(),
                shown.join(", "),
                if count > shown.len() { ", …" } else { "" }
            ));
        }
        self.unread = by_node.values().map(Vec::len).sum();
    }

    /// The runner's `recover` after the final heal must complete `recovered`.
    fn recovery(&mut self) {
        let h = self.h;
        let mut pending: Option<usize> = None;
        let mut failures = Vec::new();
        for (pos, op) in h.iter().enumerate().filter(|(_, o)| o.process == Process::NEMESIS && o.f == F::Recover) {
            if op.kind == Type::Invoke {
                if let Some(p) = pending.replace(pos) {
                    failures.push(format!("op {} never completed", self.index(p)));
                }
                continue;
            }
            pending = None;
            let outcome = op.value.get("outcome").and_then(Value::as_str).unwrap_or("none");
            if outcome != "recovered" {
                let error = op.value.get("error").map_or_else(String::new, |e| format!(": {e}"));
                failures.push(format!("op {}: outcome {outcome:?}{error}", op.index));
            }
        }
        if let Some(p) = pending {
            failures.push(format!("op {} never completed", self.index(p)));
        }
        for f in &failures {
            self.notes.push(format!("the cluster did not recover after the final heal ({f})"));
        }
        self.not_recovered = failures.len();
    }

    /// Final reads of one conversation must agree on every node.
    fn unconverged(&mut self) {
        let mut found = Vec::new();
        for (&conv, nodes) in &self.finals {
            let mut it = nodes.iter();
            let Some((&n0, r0)) = it.next() else { continue };
            let mut first: Option<(u64, Node, usize)> = None;
            for (&n, r) in it {
                let differs =
                    (0..r0.entries.len().max(r.entries.len())).find(|&i| r0.entries.get(i) != r.entries.get(i));
                if let Some(i) = differs {
                    let offset = r0.entries.get(i).or(r.entries.get(i)).map_or(i as u64 + 1, |e| e.0);
                    if first.is_none_or(|(o, _, _)| offset < o) {
                        first = Some((offset, n, r.pos));
                    }
                }
            }
            if let Some((offset, n, pos)) = first {
                found.push((conv, n0, r0.pos, n, pos, offset));
            }
        }
        for (conv, n0, p0, n, p, offset) in found {
            let show = |node: Node| {
                let fr = &self.finals[&conv][&node];
                let at = fr.text_at(offset).map_or_else(|| "nothing".to_string(), |t| format!("{:?}", self.text(t)));
                format!("{} has {at} (head {}, op {})", node_name(node), fr.head(), self.index(fr.pos))
            };
            let explanation = format!(
                "final reads of conversation {:?} differ first at offset {offset}: {}, {}",
                self.conv(conv),
                show(n0),
                show(n)
            );
            let a = Witness::new(self.h).near(p0, offset).near(p, offset).anomaly(kinds::UNCONVERGED, explanation);
            self.anomalies.push(a);
        }
    }

    /// `regressed-read`: per node and conversation, a read that ends below what a read
    /// completed before its invoke had shown there (the first one only).
    fn regressed_reads(&mut self) {
        let mut found = Vec::new();
        for (&(node, conv), reads) in &self.node_reads {
            // By completion, each with the furthest read completed so far (its head and
            // position).
            let mut done: Vec<(usize, u64, usize)> = reads.iter().map(|&(_, d, head)| (d, head, d)).collect();
            done.sort_unstable();
            let mut best: Option<(u64, usize)> = None;
            let furthest: Vec<(usize, Option<(u64, usize)>)> = done
                .iter()
                .map(|&(d, head, pos)| {
                    if best.is_none_or(|(h, _)| head > h) {
                        best = Some((head, pos));
                    }
                    (d, best)
                })
                .collect();
            let mut by_done: Vec<&NodeRead> = reads.iter().collect();
            by_done.sort_unstable_by_key(|r| r.1);
            let first = by_done.into_iter().find_map(|&(invoke, pos, head)| {
                let before = furthest.partition_point(|(d, _)| *d < invoke);
                let (shown, at) = furthest.get(before.checked_sub(1)?)?.1?;
                (shown > head).then_some((at, shown, pos, head))
            });
            if let Some(f) = first {
                found.push((node, conv, f));
            }
        }
        found.sort_unstable_by_key(|(_, _, (_, _, pos, _))| *pos);
        for (node, conv, (at, shown, pos, head)) in found {
            let explanation = format!(
                "{} {} of conversation {:?} on {} ends at offset {head}, but {} {} on the same node, completed \
                 before it was invoked, had shown it up to offset {shown}: the node answered from an older state",
                read_name(&self.h[pos].f),
                self.index(pos),
                self.conv(conv),
                node_name(Some(node)),
                read_name(&self.h[at].f),
                self.index(at),
            );
            let a = Witness::new(self.h).op(at).op(pos).anomaly(kinds::REGRESSED_READ, explanation);
            self.push(a);
        }
    }

    /// The nodes that, at one restart after damage, refused to start, when they were a
    /// majority (2 of 3): no quorum was left to rebuild from.
    fn majority_refused(&self) -> Option<(usize, Vec<String>)> {
        self.h.iter().enumerate().find_map(|(pos, op)| {
            let refused = op.process == Process::NEMESIS
                && op.f == F::Start
                && op.kind == Type::Info
                && op.value.get("outcome").and_then(Value::as_str) == Some("refused");
            let exited = op.value.get("exited").and_then(Value::as_object).filter(|_| refused)?;
            (exited.len() * 2 > 3).then(|| (pos, exited.keys().cloned().collect()))
        })
    }

    /// Every liveness send after healing must be acked — unless a majority of nodes refused
    /// to start after damage: then the shards must stop, and a failed liveness send is the
    /// correct outcome, which leaves the run undecided rather than invalid.
    fn final_sends(&mut self) {
        if let Some((pos, nodes)) = self.majority_refused() {
            let failed = self.cops.iter().filter(|c| c.f == F::FinalSend && c.outcome != Outcome::Ok).count();
            if failed > 0 {
                self.notes.push(format!(
                    "{failed} final send(s) failed while nodes {} refused to start after damage (op {}): a \
                     majority refused, so the shards correctly stopped",
                    nodes.join(", "),
                    self.index(pos)
                ));
                self.refused_liveness = failed;
            }
            return;
        }
        let mut found = Vec::new();
        for c in &self.cops {
            if c.f == F::FinalSend && c.outcome != Outcome::Ok {
                let how = match c.outcome {
                    Outcome::Fail => "failed",
                    Outcome::Info => "was indeterminate (info)",
                    _ => "never completed",
                };
                let text = c.field(self.h, "text").and_then(key).unwrap_or(Cow::Borrowed("?"));
                let explanation = format!(
                    "the liveness send {text:?} after healing {how} (op {})",
                    self.index(c.done.or(c.invoke).unwrap_or(0))
                );
                found.push(Witness::new(self.h).both(c).anomaly(kinds::FINAL_SEND_FAILED, explanation));
            }
        }
        self.anomalies.extend(found);
    }

    /// Sends to a shard that kept a majority up through a `move-with-voter-down` fault must
    /// not wait more than [`STALL_LIMIT_NS`] (see the module doc).
    fn availability(&mut self) {
        let h = self.h;
        let mut found = Vec::new();
        for (pos, op) in h.iter().enumerate() {
            let fault = op.process == Process::NEMESIS && op.f == F::Membership && op.kind == Type::Info;
            if !fault || op.value.get("variant").and_then(Value::as_str) != Some("move-with-voter-down") {
                continue;
            }
            // Its invoke: the last membership invoke before it, which must be the same fault
            // (a cut history could otherwise pair it with an older op and widen the window).
            let invoke = h[..pos]
                .iter()
                .rposition(|o| o.process == Process::NEMESIS && o.f == F::Membership && o.kind == Type::Invoke)
                .filter(|&i| {
                    let (a, b) = (&h[i].value, &op.value);
                    a.get("variant") == b.get("variant") && a.get("shard") == b.get("shard")
                });
            let convs: HashSet<&str> = op
                .value
                .get("conversations")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let Some(invoke) = invoke.filter(|_| !convs.is_empty()) else {
                self.malformed("move-with-voter-down fault without its invoke or conversations", pos);
                continue;
            };
            self.stats.availability_windows += 1;
            let (from, to) = (h[invoke].time + STALL_GRACE_NS, op.time);
            let mut worst: Option<(u64, &ClientOp)> = None;
            for c in self.cops.iter().filter(|c| c.f == F::Send) {
                let Some(i) = c.invoke.filter(|&i| (from..to).contains(&h[i].time)) else { continue };
                if !c.field(h, "conversation").and_then(Value::as_str).is_some_and(|v| convs.contains(v)) {
                    continue;
                }
                let end = c.done.map_or(to, |d| h[d].time.min(to));
                let waited = end.saturating_sub(h[i].time);
                let counts = c.outcome != Outcome::Fail || waited > STALL_LIMIT_NS;
                if counts && worst.is_none_or(|(w, _)| waited > w) {
                    worst = Some((waited, c));
                }
            }
            let Some((waited, c)) = worst else { continue };
            let waited_ms = waited / 1_000_000;
            self.stats.availability_longest_wait_ms = self.stats.availability_longest_wait_ms.max(waited_ms);
            if waited <= STALL_LIMIT_NS {
                continue;
            }
            let shard = op.value.get("shard").cloned().unwrap_or(Value::Null);
            let down = op.value.get("down").cloned().unwrap_or(Value::Null);
            let how = match (c.outcome, c.done.is_some_and(|d| h[d].time <= to)) {
                (Outcome::Ok, true) => "was acknowledged only after",
                (Outcome::Ok, false) => "was still waiting when the fault ended, after",
                (Outcome::Info, true) => "gave up (info) after",
                (Outcome::Fail, true) => "failed after",
                _ => "was still waiting when the fault ended, after",
            };
            let text = c.field(h, "text").and_then(key).unwrap_or(Cow::Borrowed("?"));
            let explanation = format!(
                "shard {shard} kept a majority of voters holding its log (only node {down} was down, no other \
                 fault; op {} to op {}), yet the send {text:?} {how} {:.1} s: more than {} s",
                self.index(invoke),
                self.index(pos),
                waited as f64 / 1e9,
                STALL_LIMIT_NS / 1_000_000_000
            );
            found.push(Witness::new(h).op(invoke).op(pos).both(c).anomaly(kinds::UNAVAILABLE, explanation));
        }
        self.anomalies.extend(found);
    }

    /// A clean stop (the `stop` fault: SIGTERM) must end in exit 0 before the nemesis gives
    /// up on it. A node another fault held paused is killed instead and is not counted.
    fn clean_stops(&mut self) {
        let h = self.h;
        let mut found = Vec::new();
        for (pos, op) in h.iter().enumerate() {
            if op.process != Process::NEMESIS || op.f != F::Stop || op.kind != Type::Info {
                continue;
            }
            let mut unclean: Vec<String> = op
                .value
                .get("exited")
                .and_then(Value::as_object)
                .map(|codes| {
                    codes
                        .iter()
                        .filter(|(_, code)| code.as_i64() != Some(0))
                        .map(|(node, code)| format!("node {node} exited with {code}"))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(killed) = op.value.get("killed").and_then(Value::as_array) {
                unclean.extend(killed.iter().map(|n| format!("node {n} had not exited and was killed")));
            }
            if unclean.is_empty() {
                continue;
            }
            let explanation =
                format!("a clean stop (SIGTERM, op {}) did not end cleanly: {}", self.index(pos), unclean.join("; "));
            let invoke = h[..pos]
                .iter()
                .rposition(|o| o.process == Process::NEMESIS && o.f == F::Stop && o.kind == Type::Invoke);
            let w = match invoke {
                Some(i) => Witness::new(h).op(i),
                None => Witness::new(h),
            };
            found.push(w.op(pos).anomaly(kinds::UNCLEAN_STOP, explanation));
        }
        self.anomalies.extend(found);
    }

    /// A send invoked after another one completed must get a higher offset. One witness per
    /// conversation; O(n log n) per conversation.
    fn real_time_order(&mut self) {
        struct S {
            invoke: usize,
            done: usize,
            offset: u64,
            ack: usize,
        }
        let mut by_conv: BTreeMap<ConvId, Vec<S>> = BTreeMap::new();
        for t in &self.texts {
            // The earliest ok (non-resend) ack of the text, and its earliest invoke: a retry
            // after `info` may have been applied by an earlier attempt.
            let best = t
                .acks
                .iter()
                .filter(|&&ai| self.cops[self.acks[ai].cop].f != F::Resend)
                .filter_map(|&ai| self.cops[self.acks[ai].cop].done.map(|d| (d, ai)))
                .min();
            let (Some((done, ai)), Some(invoke)) = (best, t.first_invoke) else { continue };
            let a = self.acks[ai];
            by_conv.entry(a.conv).or_default().push(S { invoke, done, offset: a.offset, ack: ai });
        }
        let mut found = Vec::new();
        for (conv, mut sends) in by_conv {
            let mut by_done: Vec<(usize, u64, usize)> = sends.iter().map(|s| (s.done, s.offset, s.ack)).collect();
            by_done.sort_unstable();
            sends.sort_unstable_by_key(|s| s.invoke);
            let mut j = 0;
            let mut max: Option<(u64, usize)> = None;
            for b in &sends {
                while j < by_done.len() && by_done[j].0 < b.invoke {
                    if max.is_none_or(|(o, _)| by_done[j].1 > o) {
                        max = Some((by_done[j].1, by_done[j].2));
                    }
                    j += 1;
                }
                if let Some((o, a)) = max.filter(|&(o, _)| o > b.offset) {
                    found.push((conv, a, b.ack, b.invoke, o));
                    break;
                }
            }
        }
        for (conv, a, b, b_invoke, _) in found {
            let (a, b) = (self.acks[a], self.acks[b]);
            let (ca, cb) = (&self.cops[a.cop], &self.cops[b.cop]);
            let b_done = cb.done.unwrap_or(0);
            let explanation = format!(
                "in conversation {:?}, {:?} was acked at offset {} (op {}) before {:?} was invoked (op {}), yet {:?} \
                 got the lower offset {} (op {})",
                self.conv(conv),
                self.text(a.text),
                a.offset,
                self.index(ca.done.unwrap_or(0)),
                self.text(b.text),
                self.index(b_invoke),
                self.text(b.text),
                b.offset,
                self.index(b_done)
            );
            let w = Witness::new(self.h).both(ca).op(b_invoke).op(b_done);
            self.anomalies.push(w.anomaly(kinds::REAL_TIME_ORDER, explanation));
        }
    }

    fn finish(mut self) -> CheckResult {
        let rank = |k: &str| kinds::ALL.iter().position(|x| *x == k).unwrap_or(kinds::ALL.len());
        self.anomalies.sort_by_key(|a| rank(a.kind));
        for (what, (n, first)) in &self.malformed {
            self.notes.push(format!("{n} {what} were skipped (first: op {first})"));
        }
        if self.deliveries_without_subscribe > 0 {
            self.notes.push(format!(
                "{} deliveries came before any subscribe of their subscriber; their starting offset was not checked",
                self.deliveries_without_subscribe
            ));
        }
        let undecided = if self.acks.is_empty() {
            Some("unknown: no send was acked".to_string())
        } else if self.stats.final_reads == 0 {
            Some("unknown: there is no final read".to_string())
        } else if self.unchecked > 0 {
            Some("unknown: some conversations with acked sends have no final read".to_string())
        } else if self.unread > 0 {
            Some(format!(
                "unknown: {} (node, conversation) pair(s) have a failed or no final read (see above)",
                self.unread
            ))
        } else if self.not_recovered > 0 {
            Some("unknown: the cluster did not recover after the final heal".to_string())
        } else if self.refused_liveness > 0 {
            Some("unknown: a majority of nodes refused to serve after damage".to_string())
        } else {
            None
        };
        let valid = match (self.anomalies.is_empty(), undecided) {
            (false, _) => Validity::Invalid,
            (true, Some(why)) => {
                self.notes.push(why);
                Validity::Unknown
            }
            (true, None) => Validity::Valid,
        };
        CheckResult { valid, anomalies: self.anomalies, stats: self.stats, notes: self.notes }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    use super::*;
    use crate::history::{Op, Process, Type, F};

    /// Builds synthetic histories. Send invokes carry `{conversation, client_id, client_seq,
    /// text}` (client_id = the process, a fresh seq per text); completions repeat the invoke's
    /// value and add their own fields, as the runner does.
    #[derive(Default, Clone)]
    struct H {
        ops: Vec<Op>,
        pending: HashMap<u64, (F, Value)>,
        keys: HashMap<String, (u64, u64)>,
        seq: u64,
    }

    impl H {
        fn push(&mut self, kind: Type, process: Process, f: F, value: Value, node: Option<u64>) -> u64 {
            let index = self.ops.len() as u64;
            self.ops.push(Op { index, time: index * 1_000, kind, process, f, value, node });
            index
        }

        fn invoke(&mut self, p: u64, f: F, value: Value, node: Option<u64>) -> u64 {
            self.pending.insert(p, (f.clone(), value.clone()));
            self.push(Type::Invoke, Process::Client(p), f, value, node)
        }

        /// Completes `p`'s pending invoke with `kind`, adding `extra` to the invoke's value.
        fn complete(&mut self, p: u64, kind: Type, extra: Value) -> u64 {
            let (f, mut value) = self.pending.remove(&p).expect("a pending invoke");
            let node = self.ops.iter().rev().find(|o| o.process == Process::Client(p)).and_then(|o| o.node);
            for (k, v) in extra.as_object().expect("an object") {
                value[k] = v.clone();
            }
            self.push(kind, Process::Client(p), f, value, node)
        }

        fn invoke_send_f(&mut self, p: u64, f: F, conv: &str, text: &str) -> u64 {
            let (cid, seq) = *self.keys.entry(text.to_string()).or_insert_with(|| {
                self.seq += 1;
                (p, self.seq)
            });
            self.invoke(p, f, json!({"conversation": conv, "client_id": cid, "client_seq": seq, "text": text}), None)
        }

        fn invoke_send(&mut self, p: u64, conv: &str, text: &str) -> u64 {
            self.invoke_send_f(p, F::Send, conv, text)
        }

        fn ok_send(&mut self, p: u64, offset: u64) -> u64 {
            self.complete(p, Type::Ok, json!({"offset": offset, "ts_ms": 1}))
        }

        fn send_ok(&mut self, p: u64, conv: &str, text: &str, offset: u64) -> (u64, u64) {
            (self.invoke_send(p, conv, text), self.ok_send(p, offset))
        }

        fn send_fail(&mut self, p: u64, conv: &str, text: &str) -> (u64, u64) {
            (self.invoke_send(p, conv, text), self.complete(p, Type::Fail, json!({"error": "rejected"})))
        }

        fn send_info(&mut self, p: u64, conv: &str, text: &str) -> (u64, u64) {
            (self.invoke_send(p, conv, text), self.complete(p, Type::Info, json!({"error": "timeout"})))
        }

        fn resend_ok(&mut self, p: u64, conv: &str, text: &str, offset: u64) -> (u64, u64) {
            (self.invoke_send_f(p, F::Resend, conv, text), self.ok_send(p, offset))
        }

        fn final_send_ok(&mut self, p: u64, conv: &str, text: &str, offset: u64) -> (u64, u64) {
            (self.invoke_send_f(p, F::FinalSend, conv, text), self.ok_send(p, offset))
        }

        fn read_f(&mut self, f: F, p: u64, node: u64, conv: &str, msgs: &[(u64, &str)]) -> u64 {
            self.invoke(p, f, json!({"conversation": conv}), Some(node));
            let messages: Vec<Value> = msgs.iter().map(|(o, t)| json!([o, t])).collect();
            self.complete(p, Type::Ok, json!({"messages": messages}))
        }

        fn read(&mut self, p: u64, node: u64, conv: &str, msgs: &[(u64, &str)]) -> u64 {
            self.read_f(F::Read, p, node, conv, msgs)
        }

        /// A dense final read of `texts` (offsets 1..).
        fn final_read(&mut self, node: u64, conv: &str, texts: &[&str]) -> u64 {
            let msgs: Vec<(u64, &str)> = texts.iter().enumerate().map(|(i, t)| (i as u64 + 1, *t)).collect();
            self.read_f(F::FinalRead, 400_000 + node, node, conv, &msgs)
        }

        /// A final read of `node` that failed with `error`, after the node sent `msgs`.
        fn final_read_fail(&mut self, node: u64, conv: &str, error: &str, msgs: &[(u64, &str)]) -> u64 {
            let p = 400_000 + node;
            self.invoke(p, F::FinalRead, json!({"conversation": conv}), Some(node));
            let mut extra = json!({"error": error});
            if !msgs.is_empty() {
                extra["messages"] = msgs.iter().map(|(o, t)| json!([o, t])).collect();
            }
            self.complete(p, Type::Fail, extra)
        }

        fn final_reads(&mut self, conv: &str, texts: &[&str]) {
            for node in 1..=3 {
                self.final_read(node, conv, texts);
            }
        }

        fn subscribe(&mut self, p: u64, conv: &str, from: u64, session: u64) -> u64 {
            let v = json!({"conversation": conv, "from": from, "session": session});
            self.push(Type::Ok, Process::Client(p), F::Subscribe, v, Some(1))
        }

        fn deliver(&mut self, p: u64, conv: &str, offset: u64, text: &str, session: u64) -> u64 {
            let v = json!({"conversation": conv, "offset": offset, "text": text, "session": session});
            self.push(Type::Ok, Process::Client(p), F::Deliver, v, Some(1))
        }

        fn caught_up(&mut self, p: u64, conv: &str, head: u64, session: u64) -> u64 {
            let v = json!({"conversation": conv, "head": head, "session": session});
            self.push(Type::Ok, Process::Client(p), F::CaughtUp, v, Some(1))
        }

        /// The runner's wait for leaders after the final heal; `outcome` None: never completed.
        fn recover(&mut self, outcome: Option<Value>) -> u64 {
            let inv = self.push(Type::Invoke, Process::NEMESIS, F::Recover, json!({"nodes": [1, 2, 3]}), None);
            match outcome {
                Some(v) => self.push(Type::Info, Process::NEMESIS, F::Recover, v, None),
                None => inv,
            }
        }

        fn nemesis(&mut self, f: F) {
            self.push(Type::Invoke, Process::NEMESIS, f.clone(), json!({"nodes": [1]}), None);
            self.push(Type::Info, Process::NEMESIS, f, json!({"nodes": [1], "outcome": "done"}), None);
        }

        fn check(&self) -> CheckResult {
            // Round-trip through the JSON-lines format, as the runner's history file would.
            let parsed = crate::history::parse(&crate::history::render(&self.ops)).expect("history parses");
            assert_eq!(parsed, self.ops);
            check(&parsed)
        }
    }

    const C1: [&str; 4] = ["a", "b", "i1", "c"];
    const C2: [&str; 2] = ["x", "y"];

    /// The run phase of a clean history, without final sends or reads. Ends with conversation
    /// c1 = C1 and c2 = C2 on every node.
    fn base() -> H {
        let mut h = H::default();
        h.nemesis(F::Partition);
        h.send_ok(1, "c1", "a", 1);
        // Concurrent sends to two conversations.
        h.invoke_send(2, "c1", "b");
        h.invoke_send(3, "c2", "x");
        h.ok_send(3, 1);
        h.ok_send(2, 2);
        // Indeterminate: i1 is applied (at 3), i2 is not; f1 definitely failed.
        h.send_info(4, "c1", "i1");
        h.send_fail(5, "c1", "f1");
        h.send_info(6, "c2", "i2");
        // A send retried after info under a fresh process (same text and key) that is
        // never applied, then definitely fails.
        h.send_info(8, "c2", "i3");
        h.send_fail(1008, "c2", "i3");
        h.subscribe(100, "c1", 1, 1);
        h.deliver(100, "c1", 1, "a", 1);
        h.deliver(100, "c1", 2, "b", 1);
        h.caught_up(100, "c1", 2, 1);
        h.read(200, 2, "c1", &[(1, "a")]);
        h.send_ok(1, "c1", "c", 4);
        h.resend_ok(1, "c1", "a", 1);
        h.nemesis(F::Heal);
        h.subscribe(100, "c1", 3, 2);
        h.deliver(100, "c1", 3, "i1", 2);
        h.caught_up(100, "c1", 3, 2);
        h.deliver(100, "c1", 4, "c", 2);
        // Never completes, but is applied.
        h.invoke_send(7, "c2", "y");
        h.read(200, 1, "c2", &[(1, "x"), (2, "y")]);
        h.read(201, 3, "c1", &[(1, "a"), (2, "b"), (3, "i1")]);
        h.nemesis(F::Kill);
        h.nemesis(F::Start);
        h
    }

    /// Liveness sends and final reads on three nodes, everything in place.
    fn finish(h: &mut H) {
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        h.final_reads("c2", &[&C2[..], &["z2"]].concat());
    }

    fn clean() -> H {
        let mut h = base();
        finish(&mut h);
        h
    }

    fn kinds_of(r: &CheckResult) -> BTreeSet<&'static str> {
        r.anomalies.iter().map(|a| a.kind).collect()
    }

    fn witness_indices(a: &Anomaly) -> Vec<u64> {
        a.witness.iter().map(|w| w["index"].as_u64().expect("witness ops have an index")).collect()
    }

    /// Exactly one anomaly, of `kind`, whose witness holds exactly the ops `indices`.
    fn assert_only(r: &CheckResult, kind: &str, indices: &[u64]) -> Anomaly {
        assert_eq!(r.valid, Validity::Invalid, "{r:#?}");
        assert_eq!(r.anomalies.len(), 1, "{:#?}", r.anomalies);
        let a = r.anomalies[0].clone();
        assert_eq!(a.kind, kind, "{a:#?}");
        assert!(!a.explanation.is_empty());
        assert_eq!(witness_indices(&a), indices, "{a:#?}");
        a
    }

    fn only_kinds(r: &CheckResult, expected: &[&str]) {
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(kinds_of(r), expected.iter().copied().collect(), "{:#?}", r.anomalies);
    }

    /// A history with a retention of `keep` in which conversation "t" got "t1".."t{sent}"
    /// acked at offsets 1..=sent.
    fn trimmed(keep: u64, sent: u64) -> H {
        let mut h = H::default();
        h.push(Type::Info, Process::NEMESIS, F::Retention, json!({"max_messages": keep}), None);
        for i in 1..=sent {
            h.send_ok(1, "t", &format!("t{i}"), i);
        }
        h
    }

    /// A read of `node` that says retention deleted what is before `earliest`.
    fn truncated_read(h: &mut H, f: F, p: u64, node: u64, earliest: u64, msgs: &[(u64, String)]) -> u64 {
        h.invoke(p, f, json!({"conversation": "t"}), Some(node));
        let messages: Vec<Value> = msgs.iter().map(|(o, t)| json!([o, t])).collect();
        h.complete(p, Type::Ok, json!({"messages": messages, "truncated_before": earliest}))
    }

    fn kept(from: u64, to: u64) -> Vec<(u64, String)> {
        (from..=to).map(|i| (i, format!("t{i}"))).collect()
    }

    #[test]
    fn messages_trimmed_by_retention_are_not_lost() {
        let mut h = trimmed(2, 5);
        truncated_read(&mut h, F::Read, 200, 2, 3, &kept(3, 5));
        // A subscriber from 1 is told the stream starts at 4, and goes on from there.
        h.subscribe(100, "t", 1, 1);
        h.push(
            Type::Ok,
            Process::Client(100),
            F::Truncated,
            json!({"conversation": "t", "earliest": 4, "session": 1}),
            Some(1),
        );
        h.deliver(100, "t", 4, "t4", 1);
        h.deliver(100, "t", 5, "t5", 1);
        for node in 1..=3 {
            truncated_read(&mut h, F::FinalRead, 400_000 + node, node, 4, &kept(4, 5));
        }
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Valid, "{:?}", r.notes);
        assert_eq!(r.stats.acked_trimmed, 3);
    }

    #[test]
    fn a_key_stored_again_only_beyond_the_retention_can_be_a_trim_not_a_duplicate() {
        // Retention 3: t1 at 1, resent and stored again at 6 (5 apart): t1 may have been
        // trimmed with its dedup record first.
        let mut h = trimmed(3, 5);
        h.resend_ok(1, "t", "t1", 6);
        for node in 1..=3 {
            let mut msgs = kept(3, 5);
            msgs.push((6, "t1".into()));
            truncated_read(&mut h, F::FinalRead, 400_000 + node, node, 3, &msgs);
        }
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.stats.rewritten_after_trim, 1);
        // Retention 5: the same 5 apart is within what must be kept: a real duplicate.
        let mut h = trimmed(5, 5);
        let resend = h.resend_ok(1, "t", "t1", 6);
        for node in 1..=3 {
            let mut msgs = kept(1, 5);
            msgs.push((6, "t1".into()));
            truncated_read(&mut h, F::FinalRead, 400_000 + node, node, 1, &msgs);
        }
        let r = h.check();
        assert!(
            kinds_of(&r).contains(kinds::RESEND_MISMATCH) && kinds_of(&r).contains(kinds::DUPLICATE),
            "{resend:?} {:#?}",
            r.anomalies
        );
    }

    #[test]
    fn a_trimmed_read_with_a_gap_is_a_hole_and_keeping_too_little_is_over_trimmed() {
        let mut h = trimmed(2, 5);
        let gap = truncated_read(&mut h, F::Read, 200, 2, 3, &[(3, "t3".into()), (5, "t5".into())]);
        for node in 1..=3 {
            truncated_read(&mut h, F::FinalRead, 400_000 + node, node, 4, &kept(4, 5));
        }
        assert_only(&h.check(), kinds::HOLE, &[gap]);

        let mut h = trimmed(3, 5);
        let mut finals = Vec::new();
        for node in 1..=3 {
            finals.push(truncated_read(&mut h, F::FinalRead, 400_000 + node, node, 4, &kept(4, 5)));
        }
        let r = h.check();
        only_kinds(&r, &[kinds::OVER_TRIMMED]);
        assert_eq!(r.anomalies.len(), 3, "one per node");
    }

    #[test]
    fn an_acked_message_above_a_nodes_earliest_is_still_lost_there() {
        let mut h = trimmed(2, 5);
        // Node 3 says it kept 4..=5 but shows only 5: t4 is lost there, not trimmed (and the
        // read has a hole where 4 should be).
        truncated_read(&mut h, F::FinalRead, 400_001, 1, 4, &kept(4, 5));
        truncated_read(&mut h, F::FinalRead, 400_002, 2, 4, &kept(4, 5));
        truncated_read(&mut h, F::FinalRead, 400_003, 3, 4, &kept(5, 5));
        let r = h.check();
        assert_eq!(r.valid, Validity::Invalid);
        let found = kinds_of(&r);
        assert!(found.contains(kinds::LOST_ON_NODE) && found.contains(kinds::HOLE), "{:#?}", r.anomalies);
        assert!(!found.contains(kinds::LOST), "t4 is on nodes 1 and 2: {:#?}", r.anomalies);
        // And a subscriber that skips past the earliest it was told is still a skip.
        let mut h = trimmed(2, 5);
        h.subscribe(100, "t", 1, 1);
        let told = h.push(
            Type::Ok,
            Process::Client(100),
            F::Truncated,
            json!({"conversation": "t", "earliest": 4, "session": 1}),
            Some(1),
        );
        let skip = h.deliver(100, "t", 5, "t5", 1);
        for node in 1..=3 {
            truncated_read(&mut h, F::FinalRead, 400_000 + node, node, 4, &kept(4, 5));
        }
        assert_only(&h.check(), kinds::SUBSCRIBER_SKIP, &[told, skip]);
    }

    /// A `stop` fault of nodes 1 and 2 as the nemesis records it, after `clean()`'s history.
    fn with_stop(exited: Value, killed: Value, paused_killed: Value) -> CheckResult {
        let mut h = clean();
        let nodes = json!([1, 2]);
        h.push(Type::Invoke, Process::NEMESIS, F::Stop, json!({"nodes": nodes, "variant": "all"}), None);
        let value = json!({"nodes": nodes, "variant": "all", "outcome": "stopped", "exited": exited,
            "killed": killed, "paused_killed": paused_killed});
        h.push(Type::Info, Process::NEMESIS, F::Stop, value, None);
        h.check()
    }

    #[test]
    fn a_clean_stop_must_exit_0_before_the_nemesis_gives_up() {
        let r = with_stop(json!({"1": 0, "2": 0}), json!([]), json!([]));
        assert_eq!(r.valid, Validity::Valid, "{:#?}", r.anomalies);
        // A node another fault held paused is killed instead: not the stop's failure.
        let r = with_stop(json!({"1": 0}), json!([]), json!([2]));
        assert_eq!(r.valid, Validity::Valid, "{:#?}", r.anomalies);

        let r = with_stop(json!({"1": 0, "2": 1}), json!([]), json!([]));
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.anomalies.len(), 1, "{:#?}", r.anomalies);
        assert_eq!(r.anomalies[0].kind, kinds::UNCLEAN_STOP);
        assert!(r.anomalies[0].explanation.contains("node 2 exited with 1"), "{}", r.anomalies[0].explanation);
        assert_eq!(r.anomalies[0].witness.len(), 2, "the stop's invoke and outcome");

        // Killed by a signal (no exit code), or not exited in time.
        let r = with_stop(json!({"1": null}), json!([2]), json!([]));
        assert_eq!(r.anomalies.len(), 1, "{:#?}", r.anomalies);
        let why = &r.anomalies[0].explanation;
        assert!(why.contains("node 1 exited with null") && why.contains("node 2 had not exited"), "{why}");
    }

    #[test]
    fn a_node_that_shows_less_than_it_showed_before_is_a_regressed_read() {
        let mut h = base();
        // Overlapping reads are not ordered, and another node may be behind.
        h.invoke(202, F::Read, json!({"conversation": "c1"}), Some(2));
        h.read(201, 2, "c1", &[(1, "a"), (2, "b")]);
        h.complete(202, Type::Ok, json!({"messages": [[1, "a"]]}));
        let shown = h.read(203, 2, "c1", &[(1, "a"), (2, "b"), (3, "i1")]);
        h.read(204, 1, "c1", &[(1, "a")]);
        h.read(205, 2, "c1", &[(1, "a"), (2, "b"), (3, "i1")]);
        let mut fine = h.clone();
        finish(&mut fine);
        assert_eq!(fine.check().to_json()["valid"], "valid", "{:#?}", fine.check().anomalies);
        // Then node 2 shows one message, after it had shown three.
        let later = h.read(206, 2, "c1", &[(1, "a")]);
        h.read(207, 2, "c1", &[]);
        finish(&mut h);
        let a = assert_only(&h.check(), kinds::REGRESSED_READ, &[shown, later]);
        assert!(a.explanation.contains("ends at offset 1") && a.explanation.contains("up to offset 3"), "{a:#?}");
    }

    #[test]
    fn clean_history_is_valid() {
        let h = clean();
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Valid, "{:?}", r.notes);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        let s = &r.stats;
        assert_eq!((s.sends_invoked, s.sends_ok, s.sends_fail, s.sends_info), (10, 4, 2, 4), "{s:?}");
        assert_eq!((s.resends, s.reads, s.deliveries, s.nemesis_ops), (1, 3, 4, 4), "{s:?}");
        assert_eq!((s.final_reads, s.final_sends_ok, s.final_sends_failed), (6, 2, 0), "{s:?}");
    }

    #[test]
    fn empty_history_is_unknown() {
        let r = check(&[]);
        assert_eq!(r.valid, Validity::Unknown);
        assert!(r.anomalies.is_empty());
        assert_eq!(r.stats, Stats::default());
        assert_eq!(r.to_json()["valid"], "unknown");
    }

    #[test]
    fn no_final_reads_is_unknown() {
        let r = base().check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Unknown);
        assert!(r.notes.iter().any(|n| n.contains("final read")), "{:?}", r.notes);
    }

    #[test]
    fn conversation_without_any_final_read_is_unknown() {
        let mut h = base();
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Unknown);
        assert!(r.notes.iter().any(|n| n.contains("\"c2\" (1 acked)")), "{:?}", r.notes);
    }

    /// Final sends on both conversations, and c1 = C1 + z1 on nodes 1 and 2 (not 3).
    fn finish_but_node_3_of_c1(h: &mut H) -> Vec<String> {
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_send_ok(300_001, "c2", "z2", 3);
        let c1: Vec<&str> = [&C1[..], &["z1"]].concat();
        h.final_read(1, "c1", &c1);
        h.final_read(2, "c1", &c1);
        h.final_reads("c2", &["x", "y", "z2"]);
        c1.iter().map(|t| t.to_string()).collect()
    }

    /// Undecided, with no anomaly, and a note that names `node`, `conv` and each of `words`.
    fn assert_unread(r: &CheckResult, node: u64, conv: &str, words: &[&str]) {
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Unknown, "{:?}", r.notes);
        let name = format!("node {node} was not read at the end");
        let note = r.notes.iter().find(|n| n.contains(&name)).unwrap_or_else(|| panic!("{name}: {:?}", r.notes));
        assert!(note.contains(&format!("{conv:?}")), "{note}");
        for w in words {
            assert!(note.contains(w), "{w}: {note}");
        }
    }

    #[test]
    fn a_node_missing_one_final_read_is_unknown() {
        let mut h = base();
        finish_but_node_3_of_c1(&mut h);
        assert_unread(&h.check(), 3, "c1", &["no final read", "1 of 2 conversation(s)"]);
    }

    #[test]
    fn a_node_the_settled_placement_leaves_out_is_not_expected_to_be_read() {
        // After moves, c1's shard is on nodes 1 and 2 only (and a node 4 that holds c2).
        let settled = |h: &mut H, c1: Value| {
            h.push(Type::Invoke, Process::NEMESIS, F::Settle, json!({"within_s": 180}), None);
            let holders = json!({"c1": c1, "c2": [1, 2, 3]});
            h.push(Type::Info, Process::NEMESIS, F::Settle, json!({"outcome": "settled", "holders": holders}), None);
        };
        let mut h = base();
        settled(&mut h, json!([1, 2, 4]));
        finish_but_node_3_of_c1(&mut h);
        let r = h.check();
        assert!(r.anomalies.is_empty() && r.notes.is_empty(), "{:?} {:?}", r.anomalies, r.notes);
        assert_eq!(r.valid, Validity::Valid);
        // The placement names node 3 for c1: its missing read leaves the run undecided.
        let mut h = base();
        settled(&mut h, json!([1, 2, 3]));
        finish_but_node_3_of_c1(&mut h);
        assert_unread(&h.check(), 3, "c1", &["no final read"]);
    }

    #[test]
    fn a_failed_final_read_is_not_valid() {
        let mut h = base();
        finish_but_node_3_of_c1(&mut h);
        let failed = h.final_read_fail(3, "c1", "unavailable: node 3 refuses to serve shard 1", &[]);
        let r = h.check();
        assert_unread(&r, 3, "c1", &["refuses to serve", &format!("op {failed} failed")]);
        assert_eq!((r.stats.final_reads, r.stats.final_reads_failed), (5, 1));
        assert_eq!(r.to_json()["valid"], "unknown");
    }

    #[test]
    fn a_final_read_that_fails_after_an_ok_one_is_not_valid() {
        // A node read once at the end and then failed: still not a clean final read.
        let mut h = clean();
        h.final_read_fail(3, "c2", "timeout", &[]);
        assert_unread(&h.check(), 3, "c2", &["timeout"]);
    }

    #[test]
    fn a_final_read_that_never_completed_is_not_valid() {
        let mut h = base();
        finish_but_node_3_of_c1(&mut h);
        let inv = h.invoke(400_003, F::FinalRead, json!({"conversation": "c1"}), Some(3));
        let r = h.check();
        assert_unread(&r, 3, "c1", &[&format!("op {inv} never completed")]);
        assert_eq!(r.stats.final_reads_failed, 1);
    }

    #[test]
    fn a_node_never_read_at_the_end_is_unknown() {
        // Node 3 served reads during the run but has no final read of anything.
        let mut h = base();
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_send_ok(300_001, "c2", "z2", 3);
        for node in 1..=2 {
            h.final_read(node, "c1", &[&C1[..], &["z1"]].concat());
            h.final_read(node, "c2", &["x", "y", "z2"]);
        }
        assert_unread(&h.check(), 3, "c2", &["\"c1\"", "2 of 2 conversation(s)"]);
    }

    #[test]
    fn a_partial_final_read_is_not_a_final_state() {
        // The node sent a correct prefix, then failed: no loss is concluded from it, and the
        // run is still undecided.
        let mut h = base();
        finish_but_node_3_of_c1(&mut h);
        h.final_read_fail(3, "c1", "unavailable: stream reset", &[(1, "a"), (2, "b")]);
        assert_unread(&h.check(), 3, "c1", &["stream reset"]);
    }

    #[test]
    fn a_partial_final_read_is_still_checked() {
        // What a failing node sent before its error conflicts with the other nodes.
        let mut h = base();
        finish_but_node_3_of_c1(&mut h);
        let partial = h.final_read_fail(3, "c1", "unavailable: stream reset", &[(1, "a"), (2, "q")]);
        let r = h.check();
        only_kinds(&r, &[kinds::INCONSISTENT_OFFSET, kinds::PHANTOM]);
        let a = r.anomalies.iter().find(|a| a.kind == kinds::PHANTOM).expect("phantom");
        assert_eq!(witness_indices(a), [partial]);
    }

    #[test]
    fn hole_in_a_failed_read() {
        let mut h = base();
        h.invoke(202, F::Read, json!({"conversation": "c1"}), Some(2));
        let read = h.complete(202, Type::Fail, json!({"error": "reset", "messages": [[1, "a"], [3, "i1"]]}));
        finish(&mut h);
        let a = assert_only(&h.check(), kinds::HOLE, &[read]);
        assert!(a.explanation.starts_with("failed read") && a.explanation.contains("offset 2 is missing"), "{a:?}");
    }

    #[test]
    fn a_cluster_that_did_not_recover_is_unknown() {
        let mut h = clean();
        h.recover(Some(json!({"nodes": [1, 2, 3], "outcome": "not-recovered", "error": "shard 2: leaders [None]"})));
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Unknown);
        assert!(
            r.notes.iter().any(|n| n.contains("did not recover") && n.contains("shard 2: leaders")),
            "{:?}",
            r.notes
        );

        let mut h = clean();
        let inv = h.recover(None);
        let r = h.check();
        assert_eq!(r.valid, Validity::Unknown);
        assert!(r.notes.iter().any(|n| n.contains(&format!("op {inv} never completed"))), "{:?}", r.notes);

        let mut h = clean();
        h.recover(Some(json!({"nodes": [1, 2, 3], "outcome": "recovered"})));
        let r = h.check();
        assert_eq!(r.valid, Validity::Valid, "{:?}", r.notes);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }

    #[test]
    fn anomalies_outweigh_an_undecided_end() {
        let mut h = base();
        finish_but_node_3_of_c1(&mut h);
        h.final_read_fail(3, "c1", "timeout", &[]);
        h.read(202, 2, "c1", &[(1, "a"), (2, "b"), (4, "c")]);
        h.recover(Some(json!({"outcome": "not-recovered"})));
        assert_eq!(h.check().valid, Validity::Invalid);
    }

    #[test]
    fn only_failed_or_info_sends_is_unknown() {
        let mut h = H::default();
        h.send_fail(1, "c1", "f");
        h.send_info(2, "c1", "i");
        h.final_reads("c1", &["i"]);
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Unknown);
    }

    #[test]
    fn inconsistent_offset() {
        let mut h = base();
        h.send_info(9, "c1", "q");
        let read = h.read(202, 3, "c1", &[(1, "a"), (2, "b"), (3, "q")]);
        finish(&mut h);
        let r = h.check();
        // The first op that showed offset 3 of c1 is the delivery of i1.
        let first = h.ops.iter().find(|o| o.f == F::Deliver && o.value["text"] == "i1").expect("delivery").index;
        let a = assert_only(&r, kinds::INCONSISTENT_OFFSET, &[first, read]);
        assert!(a.explanation.contains("\"i1\"") && a.explanation.contains("\"q\""), "{}", a.explanation);
    }

    #[test]
    fn conflicting_acks_are_inconsistent() {
        let mut h = base();
        let (_, ok) = h.send_ok(9, "c2", "q", 2);
        finish(&mut h);
        let r = h.check();
        // y was first shown at c2/2 by the read; then q's ack claims the same offset. q is
        // also absent from every final read.
        only_kinds(&r, &[kinds::INCONSISTENT_OFFSET, kinds::LOST]);
        let a = r.anomalies.iter().find(|a| a.kind == kinds::INCONSISTENT_OFFSET).expect("inconsistent");
        assert!(witness_indices(a).contains(&ok));
    }

    #[test]
    fn duplicate() {
        let mut h = base();
        h.send_info(9, "c1", "q");
        let read = h.read(202, 1, "c1", &[(1, "a"), (2, "b"), (3, "i1"), (4, "c"), (5, "q")]);
        h.final_send_ok(300_000, "c1", "z1", 6);
        h.final_send_ok(300_001, "c2", "z2", 3);
        let finals: Vec<u64> = (1..=3).map(|n| h.final_read(n, "c1", &["a", "b", "i1", "c", "q", "z1", "q"])).collect();
        h.final_reads("c2", &["x", "y", "z2"]);
        let r = h.check();
        let a = assert_only(&r, kinds::DUPLICATE, &[read, finals[0]]);
        assert!(a.explanation.contains("offset 5") && a.explanation.contains("offset 7"), "{}", a.explanation);
    }

    #[test]
    fn duplicate_across_conversations() {
        let mut h = base();
        finish(&mut h);
        let read = h.read(202, 2, "c2", &[(1, "x"), (2, "y"), (3, "z2"), (4, "a")]);
        let r = h.check();
        // a's ack and reads say c1/1; the read shows it in c2 as well.
        let first = h.ops.iter().find(|o| o.f == F::Deliver && o.value["text"] == "a").expect("delivery").index;
        assert_only(&r, kinds::DUPLICATE, &[first, read]);
    }

    #[test]
    fn lost_everywhere() {
        let mut h = base();
        let (_, ok) = h.send_ok(9, "c1", "l", 5);
        h.final_send_ok(300_001, "c2", "z2", 3);
        let finals: Vec<u64> = (1..=3).map(|n| h.final_read(n, "c1", &C1)).collect();
        h.final_reads("c2", &["x", "y", "z2"]);
        let r = h.check();
        let a = assert_only(&r, kinds::LOST, &[ok, finals[0], finals[1], finals[2]]);
        assert!(a.explanation.contains("\"l\"") && a.explanation.contains("head 4"), "{}", a.explanation);
    }

    #[test]
    fn lost_and_overwritten_reports_both() {
        // An acked write vanishes and another takes its offset (lost unsynced writes).
        let mut h = base();
        h.send_ok(9, "c1", "l", 5);
        h.send_info(10, "c1", "m");
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &["a", "b", "i1", "c", "m"]);
        h.final_reads("c2", &["x", "y", "z2"]);
        only_kinds(&h.check(), &[kinds::LOST, kinds::INCONSISTENT_OFFSET]);
    }

    #[test]
    fn lost_on_node() {
        let mut h = base();
        h.final_send_ok(300_001, "c2", "z2", 3);
        let n1 = h.final_read(1, "c1", &C1);
        h.final_read(2, "c1", &C1);
        let n3 = h.final_read(3, "c1", &["a", "b", "i1"]);
        h.final_reads("c2", &["x", "y", "z2"]);
        let r = h.check();
        // Node 3 being behind is also non-convergence.
        only_kinds(&r, &[kinds::LOST_ON_NODE, kinds::UNCONVERGED]);
        let a = r.anomalies.iter().find(|a| a.kind == kinds::LOST_ON_NODE).expect("lost-on-node");
        let c_ok = h.ops.iter().find(|o| o.kind == Type::Ok && o.value["text"] == "c").expect("ack").index;
        assert_eq!(witness_indices(a), [c_ok, n3, n1]);
        assert!(a.explanation.contains("node 3") && a.explanation.contains("behind"), "{}", a.explanation);
        assert_eq!(r.anomalies.iter().filter(|a| a.kind == kinds::LOST_ON_NODE).count(), 1);
    }

    #[test]
    fn read_of_failed() {
        let mut h = base();
        let read = h.read(202, 1, "c1", &[(1, "a"), (2, "b"), (3, "i1"), (4, "c"), (5, "f1")]);
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &C1);
        h.final_reads("c2", &["x", "y", "z2"]);
        let r = h.check();
        let fail = h.ops.iter().find(|o| o.kind == Type::Fail && o.value["text"] == "f1").expect("fail").index;
        // Node 1 showed f1 at 5, then its final read ends at 4: a regression too.
        only_kinds(&r, &[kinds::READ_OF_FAILED, kinds::REGRESSED_READ]);
        let a = r.anomalies.iter().find(|a| a.kind == kinds::READ_OF_FAILED).expect("read-of-failed");
        assert_eq!(witness_indices(a), [fail, read], "{a:#?}");
    }

    #[test]
    fn info_then_fail_retry_is_not_read_of_failed() {
        // i3 was sent with an indeterminate outcome, then its retry failed: it may be there.
        let mut h = base();
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_send_ok(300_001, "c2", "z2", 4);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        h.final_reads("c2", &["x", "y", "i3", "z2"]);
        let r = h.check();
        assert_eq!(r.valid, Validity::Valid, "{:#?}", r.anomalies);
    }

    #[test]
    fn phantom() {
        let mut h = base();
        let read = h.read(202, 1, "c2", &[(1, "x"), (2, "y"), (3, "ghost")]);
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        h.final_reads("c2", &C2);
        let r = h.check();
        // Node 1 showed the phantom at 3, then its final read ends at 2: a regression too.
        only_kinds(&r, &[kinds::PHANTOM, kinds::REGRESSED_READ]);
        let a = r.anomalies.iter().find(|a| a.kind == kinds::PHANTOM).expect("phantom");
        assert_eq!(witness_indices(a), [read], "{a:#?}");
        assert!(a.explanation.contains("\"ghost\""), "{}", a.explanation);
    }

    #[test]
    fn ack_mismatch() {
        let mut h = base();
        let (_, ok) = h.send_ok(9, "c2", "m", 4);
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        let finals: Vec<u64> = (1..=3).map(|n| h.final_read(n, "c2", &["x", "y", "m"])).collect();
        let r = h.check();
        assert_only(&r, kinds::ACK_MISMATCH, &[ok, finals[0]]);
    }

    #[test]
    fn hole() {
        let mut h = base();
        let read = h.read(202, 2, "c1", &[(1, "a"), (2, "b"), (4, "c")]);
        // The same hole read again from the same node is one anomaly.
        h.read(202, 2, "c1", &[(1, "a"), (2, "b"), (4, "c")]);
        finish(&mut h);
        let r = h.check();
        let a = assert_only(&r, kinds::HOLE, &[read]);
        assert!(a.explanation.contains("offset 3 is missing"), "{}", a.explanation);
    }

    #[test]
    fn hole_out_of_order() {
        let mut h = base();
        let read = h.read(202, 2, "c1", &[(2, "b"), (1, "a")]);
        finish(&mut h);
        let a = assert_only(&h.check(), kinds::HOLE, &[read]);
        assert!(a.explanation.contains("out of order"), "{}", a.explanation);
    }

    #[test]
    fn hole_witness_is_cut_around_the_hole() {
        let mut h = H::default();
        let texts: Vec<String> = (1..=100).map(|i| format!("t{i}")).collect();
        for (i, t) in texts.iter().enumerate() {
            h.send_ok(1, "c", t, i as u64 + 1);
        }
        let mut msgs: Vec<(u64, &str)> = texts.iter().enumerate().map(|(i, t)| (i as u64 + 1, t.as_str())).collect();
        msgs.remove(49); // offset 50
        let read = h.read(2, 1, "c", &msgs);
        let all: Vec<&str> = texts.iter().map(String::as_str).collect();
        h.final_reads("c", &all);
        let a = assert_only(&h.check(), kinds::HOLE, &[read]);
        let w = &a.witness[0]["value"];
        assert_eq!(w["messages_total"], 99);
        assert_eq!(w["messages"], json!([[48, "t48"], [49, "t49"], [51, "t51"], [52, "t52"], [53, "t53"]]));
        assert!(a.explanation.contains("cut"), "{}", a.explanation);
    }

    #[test]
    fn subscriber_skip() {
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        let d1 = h.deliver(101, "c1", 1, "a", 1);
        let d3 = h.deliver(101, "c1", 3, "i1", 1);
        h.deliver(101, "c1", 4, "c", 1);
        finish(&mut h);
        assert_only(&h.check(), kinds::SUBSCRIBER_SKIP, &[d1, d3]);
    }

    #[test]
    fn subscriber_skip_at_first_delivery() {
        let mut h = base();
        let s = h.subscribe(101, "c1", 1, 1);
        let d = h.deliver(101, "c1", 2, "b", 1);
        finish(&mut h);
        assert_only(&h.check(), kinds::SUBSCRIBER_SKIP, &[s, d]);
    }

    #[test]
    fn subscriber_skip_at_resume() {
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        let d1 = h.deliver(101, "c1", 1, "a", 1);
        let s2 = h.subscribe(101, "c1", 3, 2);
        h.deliver(101, "c1", 3, "i1", 2);
        finish(&mut h);
        assert_only(&h.check(), kinds::SUBSCRIBER_SKIP, &[d1, s2]);
    }

    #[test]
    fn subscriber_repeat() {
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        h.deliver(101, "c1", 1, "a", 1);
        let d2 = h.deliver(101, "c1", 2, "b", 1);
        let again = h.deliver(101, "c1", 2, "b", 1);
        h.deliver(101, "c1", 3, "i1", 1);
        finish(&mut h);
        assert_only(&h.check(), kinds::SUBSCRIBER_REPEAT, &[d2, again]);
    }

    #[test]
    fn subscriber_repeat_at_the_seam() {
        // The node's catch-up ended at 2, and live push sent 2 again.
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        h.deliver(101, "c1", 1, "a", 1);
        let d2 = h.deliver(101, "c1", 2, "b", 1);
        let seam = h.caught_up(101, "c1", 2, 1);
        let again = h.deliver(101, "c1", 2, "b", 1);
        h.deliver(101, "c1", 3, "i1", 1);
        finish(&mut h);
        let a = assert_only(&h.check(), kinds::SUBSCRIBER_REPEAT, &[d2, seam, again]);
        assert!(a.explanation.contains("seam") && a.explanation.contains("expected 3"), "{}", a.explanation);
    }

    #[test]
    fn subscriber_skip_at_the_seam() {
        // The node's catch-up ended at 2, and live push began at 4.
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        h.deliver(101, "c1", 1, "a", 1);
        let d2 = h.deliver(101, "c1", 2, "b", 1);
        let seam = h.caught_up(101, "c1", 2, 1);
        let d4 = h.deliver(101, "c1", 4, "c", 1);
        finish(&mut h);
        let a = assert_only(&h.check(), kinds::SUBSCRIBER_SKIP, &[d2, seam, d4]);
        assert!(a.explanation.contains("seam") && a.explanation.contains("expected 3"), "{}", a.explanation);
    }

    #[test]
    fn subscriber_skip_at_caught_up() {
        // The node said it was caught up at 3 having sent only 1: one skip, at the seam, and
        // the live delivery of 4 that follows is not reported again.
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        let d1 = h.deliver(101, "c1", 1, "a", 1);
        let seam = h.caught_up(101, "c1", 3, 1);
        h.deliver(101, "c1", 4, "c", 1);
        finish(&mut h);
        let a = assert_only(&h.check(), kinds::SUBSCRIBER_SKIP, &[d1, seam]);
        assert!(a.explanation.contains("offsets 2..=3 were skipped"), "{}", a.explanation);
    }

    #[test]
    fn subscriber_repeat_at_resume() {
        let mut h = base();
        h.subscribe(101, "c1", 1, 1);
        h.deliver(101, "c1", 1, "a", 1);
        let d2 = h.deliver(101, "c1", 2, "b", 1);
        let s = h.subscribe(101, "c1", 2, 2);
        h.deliver(101, "c1", 2, "b", 2);
        h.deliver(101, "c1", 3, "i1", 2);
        finish(&mut h);
        assert_only(&h.check(), kinds::SUBSCRIBER_REPEAT, &[d2, s]);
    }

    #[test]
    fn resend_mismatch() {
        let mut h = base();
        let (_, resend) = h.resend_ok(1, "c1", "b", 5);
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &C1);
        h.final_reads("c2", &["x", "y", "z2"]);
        let r = h.check();
        let original = h.ops.iter().find(|o| o.kind == Type::Ok && o.value["text"] == "b").expect("ack").index;
        assert_only(&r, kinds::RESEND_MISMATCH, &[original, resend]);
    }

    #[test]
    fn skip_dedup_bug_is_caught() {
        // The planted `skip-dedup` bug: a resend appends again.
        let mut h = base();
        h.resend_ok(1, "c1", "b", 5);
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &["a", "b", "i1", "c", "b"]);
        h.final_reads("c2", &["x", "y", "z2"]);
        only_kinds(&h.check(), &[kinds::RESEND_MISMATCH, kinds::DUPLICATE]);
    }

    #[test]
    fn real_time_order() {
        let mut h = base();
        let (a_inv, a_ok) = h.send_ok(9, "c2", "r1", 4);
        let (b_inv, b_ok) = h.send_ok(10, "c2", "r2", 3);
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        h.final_reads("c2", &["x", "y", "r2", "r1"]);
        assert_only(&h.check(), kinds::REAL_TIME_ORDER, &[a_inv, a_ok, b_inv, b_ok]);
    }

    #[test]
    fn concurrent_sends_may_complete_in_any_order() {
        let mut h = base();
        h.invoke_send(9, "c2", "r1");
        h.invoke_send(10, "c2", "r2");
        h.ok_send(9, 4);
        h.ok_send(10, 3);
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_send_ok(300_001, "c2", "z2", 5);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        h.final_reads("c2", &["x", "y", "r2", "r1", "z2"]);
        let r = h.check();
        assert_eq!(r.valid, Validity::Valid, "{:#?}", r.anomalies);
    }

    #[test]
    fn retry_applied_by_an_earlier_attempt_is_not_a_real_time_violation() {
        // r2's first attempt is indeterminate but applied at 3, before r1 is even invoked;
        // its retry after r1 completed is deduplicated to offset 3.
        let mut h = base();
        h.send_info(10, "c2", "r2");
        h.send_ok(9, "c2", "r1", 4);
        h.send_ok(1010, "c2", "r2", 3);
        h.final_send_ok(300_000, "c1", "z1", 5);
        h.final_send_ok(300_001, "c2", "z2", 5);
        h.final_reads("c1", &[&C1[..], &["z1"]].concat());
        h.final_reads("c2", &["x", "y", "r2", "r1", "z2"]);
        let r = h.check();
        assert_eq!(r.valid, Validity::Valid, "{:#?}", r.anomalies);
    }

    #[test]
    fn unconverged() {
        let mut h = base();
        h.send_info(9, "c1", "q");
        h.final_send_ok(300_001, "c2", "z2", 3);
        let n1 = h.final_read(1, "c1", &["a", "b", "i1", "c", "q"]);
        h.final_read(2, "c1", &["a", "b", "i1", "c", "q"]);
        let n3 = h.final_read(3, "c1", &C1);
        h.final_reads("c2", &["x", "y", "z2"]);
        let a = assert_only(&h.check(), kinds::UNCONVERGED, &[n1, n3]);
        assert!(a.explanation.contains("offset 5"), "{}", a.explanation);
    }

    #[test]
    fn final_send_failed() {
        let mut h = base();
        let inv = h.invoke_send_f(300_000, F::FinalSend, "c1", "z1");
        let info = h.complete(300_000, Type::Info, json!({"error": "timeout"}));
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &C1);
        h.final_reads("c2", &["x", "y", "z2"]);
        let r = h.check();
        assert_only(&r, kinds::FINAL_SEND_FAILED, &[inv, info]);
        assert_eq!(r.stats.final_sends_failed, 1);
    }

    #[test]
    fn a_final_send_failed_after_a_majority_refused_is_unknown_and_a_minority_refusal_is_not_enough() {
        let refusal = |h: &mut H, exited: Value| {
            h.push(Type::Invoke, Process::NEMESIS, F::Start, json!({"nodes": [1, 2]}), None);
            h.push(
                Type::Info,
                Process::NEMESIS,
                F::Start,
                json!({"nodes": [1, 2], "outcome": "refused", "exited": exited}),
                None,
            );
        };
        let history = |exited: Value| {
            let mut h = base();
            refusal(&mut h, exited);
            h.invoke_send_f(300_000, F::FinalSend, "c1", "z1");
            h.complete(300_000, Type::Fail, json!({"error": "unavailable"}));
            h.final_reads("c1", &C1);
            h.final_reads("c2", &["x", "y"]);
            h
        };
        let r = history(json!({"1": 3, "2": 3})).check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.valid, Validity::Unknown, "{:?}", r.notes);
        assert!(r.notes.iter().any(|n| n.contains("nodes 1, 2 refused") && n.contains("majority")), "{:?}", r.notes);
        // One refused node is rebuilt from the other two: liveness is still owed.
        let r = history(json!({"1": 3})).check();
        assert_eq!(r.valid, Validity::Invalid);
        assert!(r.anomalies.iter().any(|a| a.kind == kinds::FINAL_SEND_FAILED), "{:#?}", r.anomalies);
    }

    #[test]
    fn final_send_never_completed() {
        let mut h = base();
        h.final_send_ok(300_001, "c2", "z2", 3);
        h.final_reads("c1", &C1);
        h.final_reads("c2", &["x", "y", "z2"]);
        let inv = h.invoke_send_f(300_000, F::FinalSend, "c1", "z1");
        assert_only(&h.check(), kinds::FINAL_SEND_FAILED, &[inv]);
    }

    #[test]
    fn to_json_shape() {
        let mut h = base();
        h.read(202, 1, "c2", &[(1, "x"), (2, "y"), (3, "ghost")]);
        finish(&mut h);
        let j = h.check().to_json();
        assert_eq!(j["valid"], "invalid");
        assert_eq!(j["anomaly_count"], 2, "{j:#}"); // phantom, and ghost vs z2 at c2/3
        assert_eq!(j["anomaly_counts"]["phantom"], 1);
        assert_eq!(j["anomaly_counts"]["inconsistent-offset"], 1);
        assert_eq!(j["anomalies"][0]["kind"], "inconsistent-offset");
        assert!(j["anomalies"][0]["witness"].as_array().is_some_and(|w| w.len() == 2));
        assert_eq!(j["stats"]["final_reads"], 6);
        assert!(j["notes"].is_array());
        assert_eq!(clean().check().to_json()["valid"], "valid");
    }

    #[test]
    fn large_clean_history() {
        // 100k sends over 50 conversations, in overlapping pairs, with reads, a subscriber
        // and final reads from three nodes.
        let convs = 50u64;
        let mut h = H::default();
        let mut heads = vec![0u64; convs as usize];
        let mut logs: Vec<Vec<String>> = vec![Vec::new(); convs as usize];
        h.subscribe(100_000, "k0", 1, 1);
        for i in 0..50_000u64 {
            let c = (i % convs) as usize;
            let conv = format!("k{c}");
            let (t1, t2) = (format!("v{i}a"), format!("v{i}b"));
            h.invoke_send(1, &conv, &t1);
            h.invoke_send(2, &conv, &t2);
            h.ok_send(2, heads[c] + 1);
            h.ok_send(1, heads[c] + 2);
            logs[c].push(t2);
            logs[c].push(t1);
            heads[c] += 2;
            if c == 0 {
                for o in heads[c] - 1..=heads[c] {
                    let t = logs[c][o as usize - 1].clone();
                    h.deliver(100_000, "k0", o, &t, 1);
                }
            }
            if i % 5_000 == 0 {
                let msgs: Vec<(u64, &str)> =
                    logs[c].iter().enumerate().map(|(i, t)| (i as u64 + 1, t.as_str())).collect();
                h.read(3, 1 + i % 3, &conv, &msgs);
            }
        }
        for (c, log) in logs.iter().enumerate() {
            let texts: Vec<&str> = log.iter().map(String::as_str).collect();
            h.final_reads(&format!("k{c}"), &texts);
        }
        let started = std::time::Instant::now();
        let r = check(&h.ops);
        eprintln!("checked {} ops in {:?}", h.ops.len(), started.elapsed());
        assert!(r.anomalies.is_empty(), "{:#?}", &r.anomalies[..r.anomalies.len().min(3)]);
        assert_eq!(r.valid, Validity::Valid);
        assert_eq!(r.stats.sends_ok, 100_000);
        assert_eq!(r.stats.final_reads, 150);
    }

    // ---- availability (`move-with-voter-down`) ----

    /// Sets op `index`'s time to `ms` milliseconds into the run.
    fn at(h: &mut H, index: u64, ms: u64) -> u64 {
        h.ops[index as usize].time = ms * 1_000_000;
        index
    }

    /// The kill and the membership invoke of a `move-with-voter-down` fault on c1's shard at
    /// `ms`; returns the invoke's index.
    fn voter_down_begins(h: &mut H, ms: u64) -> u64 {
        let kill = json!({"nodes": [3], "variant": "a follower of a shard about to move"});
        let i = h.push(Type::Invoke, Process::NEMESIS, F::Kill, kill.clone(), None);
        at(h, i, ms);
        let i = h.push(Type::Info, Process::NEMESIS, F::Kill, kill, None);
        at(h, i, ms);
        let asked = json!({"variant": "move-with-voter-down", "shard": 0, "down": 3, "leader": 1,
                           "conversations": ["c1"], "actions": [{"move": {"shard": 0, "from": 2, "to": 4}}]});
        let i = h.push(Type::Invoke, Process::NEMESIS, F::Membership, asked, None);
        at(h, i, ms)
    }

    fn voter_down_ends(h: &mut H, ms: u64) -> u64 {
        let done = json!({"variant": "move-with-voter-down", "shard": 0, "down": 3, "conversations": ["c1"],
                          "outcome": "asked", "move_ended": true});
        let i = h.push(Type::Info, Process::NEMESIS, F::Membership, done, None);
        at(h, i, ms)
    }

    /// A send by `p` to `conv` invoked at `from` ms and completed `kind` at `to` ms (an
    /// indeterminate or failed one, so that no final read must hold it); its indices.
    fn timed_send(h: &mut H, p: u64, conv: &str, text: &str, kind: Type, from: u64, to: u64) -> (u64, u64) {
        let i = h.invoke_send(p, conv, text);
        at(h, i, from);
        let d = h.complete(p, kind, json!({"error": "timeout"}));
        (i, at(h, d, to))
    }

    #[test]
    fn a_shard_that_keeps_acknowledging_through_a_move_with_a_voter_down_is_valid() {
        let mut h = base();
        voter_down_begins(&mut h, 10_000);
        // Within the first second: not checked, however long it waits.
        timed_send(&mut h, 20, "c1", "w0", Type::Info, 10_500, 19_000);
        timed_send(&mut h, 21, "c1", "w1", Type::Info, 11_500, 11_600);
        // A fast failure did not wait.
        timed_send(&mut h, 22, "c1", "w2", Type::Fail, 12_000, 12_010);
        // Another shard's conversation may wait (its leader may have been the node killed).
        timed_send(&mut h, 23, "c2", "w3", Type::Info, 12_000, 25_000);
        timed_send(&mut h, 24, "c1", "w4", Type::Info, 20_000, 24_000);
        voter_down_ends(&mut h, 30_000);
        finish(&mut h);
        let r = h.check();
        assert_eq!(r.valid, Validity::Valid, "{:#?} {:?}", r.anomalies, r.notes);
        assert_eq!((r.stats.availability_windows, r.stats.availability_longest_wait_ms), (1, 4_000));
    }

    #[test]
    fn a_send_waiting_more_than_five_seconds_while_its_shard_keeps_a_majority_is_unavailable() {
        for (kind, words) in [
            (Some((Type::Info, 8_000)), "gave up (info) after 8.0 s"),
            (Some((Type::Fail, 6_000)), "failed after 6.0 s"),
            (None, "was still waiting when the fault ended, after 18.0 s"),
        ] {
            let mut h = base();
            let begins = voter_down_begins(&mut h, 10_000);
            timed_send(&mut h, 21, "c1", "w1", Type::Info, 11_500, 11_600);
            let mut witness = vec![begins];
            let ends = match kind {
                Some((kind, wait_ms)) => {
                    let (i, d) = timed_send(&mut h, 22, "c1", "w2", kind, 12_000, 12_000 + wait_ms);
                    let ends = voter_down_ends(&mut h, 30_000);
                    witness.extend([ends, i, d]);
                    ends
                }
                None => {
                    // Never answered.
                    let i = h.invoke_send(22, "c1", "w2");
                    at(&mut h, i, 12_000);
                    let ends = voter_down_ends(&mut h, 30_000);
                    witness.extend([ends, i]);
                    ends
                }
            };
            assert!(ends > begins);
            finish(&mut h);
            let a = assert_only(&h.check(), kinds::UNAVAILABLE, &witness);
            assert!(a.explanation.contains(words), "{}", a.explanation);
            assert!(a.explanation.contains("only node 3 was down"), "{}", a.explanation);
        }
    }

    /// A malformed `move-with-voter-down` window: noted, not checked.
    fn assert_noted_not_checked(mut h: H) {
        finish(&mut h);
        let r = h.check();
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.stats.availability_windows, 0);
        assert!(r.notes.iter().any(|n| n.contains("move-with-voter-down")), "{:?}", r.notes);
    }

    #[test]
    fn a_move_with_voter_down_fault_without_its_conversations_is_noted_not_checked() {
        let mut h = base();
        let i = h.push(Type::Invoke, Process::NEMESIS, F::Membership, json!({"variant": "move-with-voter-down"}), None);
        at(&mut h, i, 10_000);
        timed_send(&mut h, 22, "c1", "w2", Type::Info, 12_000, 20_000);
        let d = h.push(Type::Info, Process::NEMESIS, F::Membership, json!({"variant": "move-with-voter-down"}), None);
        at(&mut h, d, 30_000);
        assert_noted_not_checked(h);
    }

    #[test]
    fn a_move_with_voter_down_end_is_paired_only_with_its_own_invoke() {
        // A cut history: the fault's invoke is missing, and the membership invoke before its
        // info is an ordinary move long before. Pairing them would check a send that waited
        // through other faults; the window is noted as malformed instead.
        let mut h = base();
        let i = h.push(Type::Invoke, Process::NEMESIS, F::Membership, json!({"variant": "move", "shard": 0}), None);
        at(&mut h, i, 1_000);
        timed_send(&mut h, 22, "c1", "w2", Type::Info, 5_000, 20_000);
        voter_down_ends(&mut h, 30_000);
        assert_noted_not_checked(h);
    }

    #[test]
    fn two_move_with_voter_down_faults_are_checked_each_in_its_own_window() {
        let mut h = base();
        voter_down_begins(&mut h, 10_000);
        timed_send(&mut h, 21, "c1", "w1", Type::Info, 12_000, 14_000);
        voter_down_ends(&mut h, 20_000);
        // Between the windows a send may wait (another fault may be in effect then).
        timed_send(&mut h, 22, "c1", "w2", Type::Info, 21_000, 29_000);
        let begins = voter_down_begins(&mut h, 30_000);
        let (i, d) = timed_send(&mut h, 23, "c1", "w3", Type::Info, 32_000, 39_000);
        let ends = voter_down_ends(&mut h, 40_000);
        finish(&mut h);
        let r = h.check();
        assert_eq!(r.stats.availability_windows, 2);
        let a = assert_only(&r, kinds::UNAVAILABLE, &[begins, ends, i, d]);
        assert!(a.explanation.contains("after 7.0 s"), "{}", a.explanation);
    }
}
