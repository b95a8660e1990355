//! Hostile bytes against every decoder a node runs: client requests, peer requests and
//! answers, and stored values. Two harnesses, both on stable Rust:
//!
//! - **lying lengths, exhaustively**: for a sample of every message variant, every position of
//!   its encoding gets a varint announcing 2^32 and 2^63 (inserted there, and in place of the
//!   byte there). Every `String` and `Vec` length prefix of every message is one of those
//!   positions. Decoding must return (a value or an error) without panicking or aborting:
//!   bincode would allocate the announced size first, and an allocation of 2^63 aborts the
//!   process;
//! - **mutations, by proptest**: random flips, insertions and cuts of valid encodings. The
//!   number of cases is proptest's (`PROPTEST_CASES`, 256 by default), so `scripts/test`
//!   runs a bounded number.

use proptest::prelude::*;
use serde::Serialize;

use crate::chat::{
    Command, CursorCommand, DedupRecord, Members, MembersCommand, Membership, Retention, RetentionCommand, SendCommand,
    StoredMessage, TrimCommand,
};
use crate::net::frame;
use crate::net::wire::{MemberChange, Request, SendRequest};
use crate::raft::formation::{ClusterRecord, Stage};
use crate::raft::log_store::Watermark;
use crate::raft::rpc::{PeerRequest, PeerResponse};
use crate::raft::types::{
    AppendEntriesRequest, AppendEntriesResponse, Entry, LogId, Member, SnapshotMeta, Vote, VoteRequest, VoteResponse, C,
};
use crate::store::codec;

fn send_request(conversation: &str, text: &str) -> SendRequest {
    SendRequest {
        conversation: conversation.into(),
        sender: "ann".into(),
        client_id: 7,
        client_seq: 9,
        text: text.into(),
    }
}

fn send_command(conversation: &str) -> SendCommand {
    SendCommand {
        conversation: conversation.into(),
        sender: "ann".into(),
        client_id: 7,
        client_seq: 9,
        ts_ms: 1,
        text: "hello".into(),
    }
}

fn requests() -> Vec<Request> {
    vec![
        Request::Send(send_request("room", "hello")),
        Request::Subscribe { conversation: "room".into(), from: 3, follow: true },
        Request::SetCursor { user: "ann".into(), conversation: "room".into(), offset: 2 },
        Request::GetCursor { user: "ann".into(), conversation: "room".into() },
        Request::GetCursorFromLeader { user: "ann".into(), conversation: "room".into() },
        Request::Status,
        Request::SendBatch(vec![send_request("a", "x"), send_request("b", "yy")]),
        Request::Members { conversation: "room".into(), change: MemberChange::Show },
        Request::Members {
            conversation: "room".into(),
            change: MemberChange::Change(Membership::Create { members: vec!["bo".into()] }),
        },
        Request::Members {
            conversation: "room".into(),
            change: MemberChange::Change(Membership::Add { user: "bo".into() }),
        },
        Request::Members {
            conversation: "room".into(),
            change: MemberChange::Change(Membership::Remove { user: "bo".into() }),
        },
        Request::SetRetention {
            conversation: "room".into(),
            retention: Retention { max_messages: None, max_age_ms: Some(60_000), max_bytes: None },
        },
    ]
}

fn commands() -> Vec<Command> {
    vec![
        Command::Send(send_command("room")),
        Command::Cursor(CursorCommand { user: "ann".into(), conversation: "room".into(), offset: 1 }),
        Command::SendBatch(vec![send_command("a"), send_command("b")]),
        Command::Members(MembersCommand {
            conversation: "room".into(),
            by: "ann".into(),
            change: Membership::Create { members: vec!["bo".into(), "cy".into()] },
        }),
        Command::SetRetention(RetentionCommand {
            conversation: "room".into(),
            by: "ann".into(),
            admin: false,
            retention: Retention { max_messages: Some(100), max_age_ms: None, max_bytes: Some(1 << 20) },
        }),
        Command::Trim(TrimCommand { conversation: "room".into(), before: 42 }),
        Command::Place(crate::placement::PlacementCommand::SetPreferredLeader { shard: 3, node: 2 }),
        Command::TrimUnder(crate::chat::TrimUnderCommand {
            trim: TrimCommand { conversation: "room".into(), before: 42 },
            planned_under: Retention { max_messages: None, max_age_ms: Some(60_000), max_bytes: None },
        }),
    ]
}

fn entries() -> Vec<Entry> {
    use openraft::entry::RaftEntry;
    commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| Entry::new_normal(openraft::testing::log_id::<C>(1, 1, i as u64 + 1), c))
        .collect()
}

fn peer_requests() -> Vec<PeerRequest> {
    let member = Member { peer_addr: "127.0.0.1:7201".into(), client_addr: "127.0.0.1:7101".into() };
    let vote = Vote::new(3, 2);
    let last: LogId = openraft::testing::log_id::<C>(3, 2, 9);
    vec![
        PeerRequest::Append {
            shard: 1,
            to: 2,
            rpc: AppendEntriesRequest { vote, prev_log_id: Some(last), leader_commit: Some(last), entries: entries() },
        },
        PeerRequest::Appends(vec![
            (
                1,
                2,
                AppendEntriesRequest { vote, prev_log_id: Some(last), leader_commit: Some(last), entries: entries() },
            ),
            (3, 2, AppendEntriesRequest { vote, prev_log_id: None, leader_commit: None, entries: vec![] }),
        ]),
        PeerRequest::Vote { shard: 1, to: 2, rpc: VoteRequest::new(vote, Some(last)) },
        PeerRequest::PreVote {
            shard: 1,
            to: 2,
            rpc: VoteRequest { leadership_transfer: true, ..VoteRequest::new(vote, None) },
        },
        PeerRequest::Snapshot { shard: 1, to: 2, vote, meta: SnapshotMeta::default() },
        PeerRequest::SnapshotChunk(vec![1, 2, 3, 4]),
        PeerRequest::SnapshotEnd { bytes: 4 },
        PeerRequest::Hello,
        PeerRequest::Prepare { cluster: 77 },
        PeerRequest::Join { shard: 1, node: 3, member: member.clone() },
        PeerRequest::Promote { shard: 1, replica: 3 | (1 << 32), member },
        PeerRequest::UserSends { node: 2, users: vec![("ann".into(), 3), ("bo".into(), 1)] },
        PeerRequest::Leaving { node: 2, incarnation: 9 },
    ]
}

/// A peer's answers, those with a length inside above all (a leader decodes them).
fn peer_responses() -> Vec<PeerResponse> {
    let last: LogId = openraft::testing::log_id::<C>(3, 2, 9);
    vec![
        PeerResponse::Append(AppendEntriesResponse::PartialSuccess(Some(last))),
        PeerResponse::Appends(vec![
            PeerResponse::Append(AppendEntriesResponse::Success),
            PeerResponse::Error("no shard 4 here".into()),
            PeerResponse::Busy,
            PeerResponse::Append(AppendEntriesResponse::HigherVote(Vote::new(4, 1))),
        ]),
        PeerResponse::Vote(VoteResponse::new(Vote::new(3, 2), Some(last), true)),
        PeerResponse::Hello(Some(ClusterRecord { cluster: 77, node: 2, stage: Stage::Formed })),
        PeerResponse::LearnerAdded { replica: 3 | (1 << 32), leaving: vec![3, 5] },
        PeerResponse::PlacementRefused("node 4 still holds replicas".into()),
        PeerResponse::NotRejoined {
            reason: "node 3 holds no other voter in shard 2".into(),
            newest: Some(3 | (1 << 32)),
        },
        PeerResponse::ClusterMap(Box::default()),
        PeerResponse::Behind { entries: Some(12) },
        PeerResponse::NotLeader { leader: Some(1) },
    ]
}

/// Every stored value, encoded as the store writes it.
fn stored() -> Vec<(&'static str, Vec<u8>)> {
    let message = StoredMessage {
        conversation: "room".into(),
        offset: 4,
        sender: "ann".into(),
        ts_ms: 1,
        client_id: 7,
        client_seq: 9,
        text: "hello".into(),
    };
    let members =
        Members { users: ["ann".to_string(), "bo".to_string()].into(), removed: [("cy".to_string(), 3)].into() };
    let mut out = vec![
        ("message", codec::encode(&message)),
        ("dedup", codec::encode(&DedupRecord { offset: 4, ts_ms: 1, digest: crate::chat::text_digest("hello") })),
        ("members", codec::encode(&members)),
        ("retention", codec::encode(&Retention { max_messages: Some(5), max_age_ms: Some(9), max_bytes: None })),
        ("vote", codec::encode(&Vote::new(3, 2))),
        ("watermark", codec::encode(&Watermark { vote: Some(Vote::new(3, 2)), last: None })),
        ("cluster", codec::encode(&ClusterRecord { cluster: 1, node: 2, stage: Stage::Formed })),
    ];
    out.extend(entries().iter().map(|e| ("entry", codec::encode(e))));
    out
}

/// Decodes a stored value as the store would, by its kind.
fn decode_stored(kind: &str, bytes: &[u8]) -> bool {
    match kind {
        "message" => codec::decode::<StoredMessage>(bytes).is_ok(),
        "dedup" => codec::decode::<DedupRecord>(bytes).is_ok(),
        "members" => codec::decode::<Members>(bytes).is_ok(),
        "retention" => codec::decode::<Retention>(bytes).is_ok(),
        "vote" => codec::decode::<Vote>(bytes).is_ok(),
        "watermark" => codec::decode::<Watermark>(bytes).is_ok(),
        "cluster" => codec::decode::<ClusterRecord>(bytes).is_ok(),
        _ => codec::decode::<Entry>(bytes).is_ok(),
    }
}

/// The varints of bincode's standard configuration announcing 2^32 and 2^63.
fn lies() -> [Vec<u8>; 2] {
    let mut four = vec![252];
    four.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut eight = vec![253];
    eight.extend_from_slice(&(1u64 << 63).to_le_bytes());
    [four, eight]
}

/// `bytes` with a lying length at every position from `from` on: inserted, and in place of
/// the byte there.
fn lying_variants(bytes: &[u8], from: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for at in from..=bytes.len() {
        for lie in lies() {
            let mut inserted = bytes[..at].to_vec();
            inserted.extend_from_slice(&lie);
            inserted.extend_from_slice(&bytes[at..]);
            out.push(inserted);
            if at < bytes.len() {
                let mut replaced = bytes[..at].to_vec();
                replaced.extend_from_slice(&lie);
                replaced.extend_from_slice(&bytes[at + 1..]);
                out.push(replaced);
            }
        }
    }
    out
}

/// A frame body (version byte, then bincode) of a value.
fn body<T: Serialize>(value: &T) -> Vec<u8> {
    frame::encode(value)[4..].to_vec()
}

/// Decodes every lying variant of every sample; returns (variants, refused). Reaching the
/// end at all is the point: a panic fails the test and an abort kills it.
fn lie_to(samples: Vec<Vec<u8>>, from: usize, decode: impl Fn(&[u8]) -> bool) -> (usize, usize) {
    let (mut tried, mut refused) = (0, 0);
    for sample in samples {
        for variant in lying_variants(&sample, from) {
            tried += 1;
            if !decode(&variant) {
                refused += 1;
            }
        }
    }
    (tried, refused)
}

#[test]
fn every_length_of_every_client_request_may_lie() {
    let samples: Vec<Vec<u8>> = requests().iter().map(body).collect();
    let (tried, refused) = lie_to(samples, 1, |b| frame::decode_body::<Request>(b).is_ok());
    assert!(tried >= 400 && refused > tried / 2, "{refused} of {tried} refused");
}

#[test]
fn every_length_of_every_peer_request_may_lie() {
    let samples: Vec<Vec<u8>> = peer_requests().iter().map(body).collect();
    let (tried, refused) = lie_to(samples, 1, |b| frame::decode_body::<PeerRequest>(b).is_ok());
    assert!(tried >= 800 && refused > tried / 2, "{refused} of {tried} refused");
}

#[test]
fn every_length_of_every_peer_answer_may_lie() {
    let samples: Vec<Vec<u8>> = peer_responses().iter().map(body).collect();
    for sample in &samples {
        assert!(frame::decode_body::<PeerResponse>(sample).is_ok(), "the sample decodes");
    }
    let (tried, refused) = lie_to(samples, 1, |b| frame::decode_body::<PeerResponse>(b).is_ok());
    assert!(tried >= 400 && refused > tried / 2, "{refused} of {tried} refused");
}

#[test]
fn every_length_of_every_stored_value_may_lie() {
    for (kind, bytes) in stored() {
        assert!(decode_stored(kind, &bytes), "the {kind} sample decodes");
        let (tried, refused) = lie_to(vec![bytes], 1, |b| decode_stored(kind, b));
        assert!(tried > 0 && refused > tried / 2, "{kind}: {refused} of {tried} refused");
    }
}

// The known lie: the conversation of a `Request::Send` announcing 2^32 or 2^63 bytes, right
// after the variant index, is refused (not merely survived).
#[test]
fn a_lying_conversation_length_is_refused() {
    let sample = body(&Request::Send(send_request("c", "x")));
    for lie in lies() {
        let mut lying = sample[..2].to_vec();
        lying.extend_from_slice(&lie);
        lying.extend_from_slice(&sample[3..]);
        assert!(frame::decode_body::<Request>(&lying).is_err());
    }
}

/// A random mutation of `bytes`: flip a bit, insert a byte, or cut the tail.
fn mutate(bytes: &[u8], op: u8, at: prop::sample::Index, value: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = at.index(out.len().max(1));
    match op % 3 {
        0 if !out.is_empty() => out[at] ^= 1 << (value % 8),
        1 => out.insert(at.min(out.len()), value),
        _ => out.truncate(at),
    }
    out
}

proptest! {
    // Mutated requests, peer requests and answers, and stored values decode or are refused,
    // never panic.
    #[test]
    fn mutated_encodings_never_panic(
        which in 0usize..64,
        mutations in prop::collection::vec((any::<u8>(), any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let (requests, peers, answers, stored) = (requests(), peer_requests(), peer_responses(), stored());
        let mut bytes = match which % 4 {
            0 => body(&requests[which % requests.len()]),
            1 => body(&peers[which % peers.len()]),
            2 => body(&answers[which % answers.len()]),
            _ => stored[which % stored.len()].1.clone(),
        };
        for (op, at, value) in mutations {
            bytes = mutate(&bytes, op, at, value);
        }
        let _ = frame::decode_body::<Request>(&bytes);
        let _ = frame::decode_body::<PeerRequest>(&bytes);
        let _ = frame::decode_body::<PeerResponse>(&bytes);
        for (kind, _) in stored.iter() {
            let _ = decode_stored(kind, &bytes);
        }
    }
}
