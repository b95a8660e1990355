//! Unit and property tests of the chat domain's pure apply.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn send_as(conversation: &str, sender: &str, client_id: u64, client_seq: u64, ts_ms: u64, text: &str) -> Command {
    Command::Send(SendCommand {
        conversation: conversation.to_string(),
        sender: sender.to_string(),
        client_id,
        client_seq,
        ts_ms,
        text: text.to_string(),
    })
}

fn send(conversation: &str, client_id: u64, client_seq: u64, ts_ms: u64, text: &str) -> Command {
    send_as(conversation, "alice", client_id, client_seq, ts_ms, text)
}

fn members(conversation: &str, by: &str, change: Membership) -> Command {
    Command::Members(MembersCommand { conversation: conversation.into(), by: by.into(), change })
}

fn add(conversation: &str, by: &str, user: &str) -> Command {
    members(conversation, by, Membership::Add { user: user.into() })
}

fn cursor(user: &str, conversation: &str, offset: u64) -> Command {
    Command::Cursor(CursorCommand { user: user.to_string(), conversation: conversation.to_string(), offset })
}

fn appended(offset: u64, ts_ms: u64, duplicate: bool) -> Outcome {
    Outcome::Appended { offset, ts_ms, duplicate }
}

fn is_invalid_id(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Rejected { reason: Rejection::InvalidId(_) })
}

/// A view holding `n` messages in `conversation`, sent by client 1000 with seqs 0..n.
fn view_with(conversation: &str, n: u64) -> MemView {
    let mut view = MemView::default();
    for i in 0..n {
        assert_eq!(view.apply(&send(conversation, 1000, i, i, "m")), appended(i + 1, i, false));
    }
    view
}

fn persist(view: &mut MemView, effects: Vec<Effect>) {
    view.persist(effects);
}

fn unwrap_infallible<T>(r: Result<T, std::convert::Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// Independent, straightforward 64-bit FNV-1a.
fn fnv1a64_reference(data: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 14_695_981_039_346_656_037; // 0xcbf29ce484222325
    const PRIME: u64 = 1_099_511_628_211; // 0x100000001b3
    let mut h = OFFSET_BASIS;
    for &b in data {
        h ^= b as u64;
        h = ((h as u128 * PRIME as u128) % (1u128 << 64)) as u64;
    }
    h
}

// ---------------------------------------------------------------------------------------
// Offsets
// ---------------------------------------------------------------------------------------

// Promise: offsets are dense per conversation, start at 1, and conversations do not
// share a counter.
#[test]
fn offsets_are_dense_per_conversation_and_independent() {
    let mut view = MemView::default();
    let plan = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("c", 1), ("b", 2), ("a", 4)];
    for (seq, (conv, expected)) in plan.iter().enumerate() {
        let outcome = view.apply(&send(conv, 7, seq as u64, 100 + seq as u64, "hi"));
        assert_eq!(outcome, appended(*expected, 100 + seq as u64, false), "step {seq} in {conv}");
    }
    assert_eq!(view.heads.get("a"), Some(&4));
    assert_eq!(view.heads.get("b"), Some(&2));
    assert_eq!(view.heads.get("c"), Some(&1));
    assert_eq!(view.messages.len(), plan.len());
    let a_offsets: Vec<u64> = view.messages.iter().filter(|m| m.conversation == "a").map(|m| m.offset).collect();
    assert_eq!(a_offsets, vec![1, 2, 3, 4]);
}

// Promise: sends batched into one entry get consecutive offsets in batch order, and a
// retry of a key inside the same batch is answered as the duplicate it is.
#[test]
fn send_batch_orders_and_dedups_within_the_batch() {
    let mut view = view_with("a", 2);
    let batch = Command::SendBatch(vec![
        SendCommand {
            conversation: "a".into(),
            sender: "alice".into(),
            client_id: 9,
            client_seq: 1,
            ts_ms: 5,
            text: "x".into(),
        },
        SendCommand {
            conversation: "b".into(),
            sender: "alice".into(),
            client_id: 9,
            client_seq: 2,
            ts_ms: 5,
            text: "y".into(),
        },
        SendCommand {
            conversation: "a".into(),
            sender: "alice".into(),
            client_id: 9,
            client_seq: 3,
            ts_ms: 6,
            text: "z".into(),
        },
        SendCommand {
            conversation: "a".into(),
            sender: "alice".into(),
            client_id: 9,
            client_seq: 1,
            ts_ms: 7,
            text: "x".into(),
        },
        SendCommand {
            conversation: "".into(),
            sender: "alice".into(),
            client_id: 9,
            client_seq: 4,
            ts_ms: 7,
            text: "w".into(),
        },
    ]);
    let Outcome::Batch(outcomes) = view.apply(&batch) else { panic!("a batch has a batch outcome") };
    assert_eq!(
        &outcomes[..4],
        &[appended(3, 5, false), appended(1, 5, false), appended(4, 6, false), appended(3, 5, true)]
    );
    assert!(is_invalid_id(&outcomes[4]));
    assert_eq!(view.heads.get("a"), Some(&4));
    assert_eq!(view.heads.get("b"), Some(&1));
    assert_eq!(view.messages.len(), 2 + 3);
}

// Promise: an accepted send produces exactly the message, the new head and the dedup
// record, in that order, with every field carried over from the command.
#[test]
fn accepted_send_effects_are_exact() {
    let mut view = view_with("room", 2);
    let command = send_as("room", "alice", 5, 9, 1234, "hello");
    let (outcome, effects) = unwrap_infallible(apply(&mut view, &command));
    assert_eq!(outcome, appended(3, 1234, false));
    let expected = vec![
        Effect::PutMessage(StoredMessage {
            conversation: "room".into(),
            offset: 3,
            sender: "alice".into(),
            ts_ms: 1234,
            client_id: 5,
            client_seq: 9,
            text: "hello".into(),
        }),
        Effect::SetHead { conversation: "room".into(), head: 3 },
        Effect::PutDedup {
            key: DedupKey { conversation: "room".into(), sender: "alice".into(), client_id: 5, client_seq: 9 },
            record: DedupRecord { offset: 3, ts_ms: 1234, digest: text_digest("hello") },
        },
    ];
    assert_eq!(effects, expected);
}

// Promise: the first send to a conversation creates it with the sender as its only member,
// in the same atomic set of effects as the message.
#[test]
fn the_first_send_creates_the_conversation_with_its_sender() {
    let mut view = MemView::default();
    let (outcome, effects) = unwrap_infallible(apply(&mut view, &send_as("new", "ann", 1, 1, 5, "hi")));
    assert_eq!(outcome, appended(1, 5, false));
    let want = Members { users: ["ann".to_string()].into(), removed: Default::default() };
    assert_eq!(effects.first(), Some(&Effect::SetMembers { conversation: "new".into(), members: want }));
    assert_eq!(effects.len(), 4);
}

// ---------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------

// Promise: a retry of the same (client_id, client_seq) answers the original offset and ts,
// flagged duplicate, and appends nothing - even if the retry carries another ts or text.
#[test]
fn retry_returns_original_offset_and_ts_without_appending() {
    let mut view = MemView::default();
    assert_eq!(view.apply(&send("room", 1, 1, 100, "first")), appended(1, 100, false));
    assert_eq!(view.apply(&send("room", 2, 1, 200, "other")), appended(2, 200, false));
    let before = view.clone();

    // Exact retry.
    assert_eq!(view.apply(&send("room", 1, 1, 100, "first")), appended(1, 100, true));
    // Retry re-stamped by a new leader: still the original answer.
    assert_eq!(view.apply(&send("room", 1, 1, 999, "first")), appended(1, 100, true));
    assert_eq!(view.messages, before.messages);
    assert_eq!(view, before);

    // The pure apply yields no effects for a duplicate.
    let (outcome, effects) = unwrap_infallible(apply(&mut view, &send("room", 1, 1, 5, "first")));
    assert_eq!(outcome, appended(1, 100, true));
    assert!(effects.is_empty());

    // The same client with the next seq appends normally.
    assert_eq!(view.apply(&send("room", 1, 2, 300, "second")), appended(3, 300, false));
}

// Promise: a key reused in the same conversation for another text is rejected with
// SeqReused and changes nothing; the same key in another conversation is another message.
#[test]
fn a_key_reused_for_another_text_is_rejected_and_keys_are_per_conversation() {
    let mut view = MemView::default();
    assert_eq!(view.apply(&send("a", 1, 1, 100, "x")), appended(1, 100, false));
    let before = view.clone();
    let (outcome, effects) = unwrap_infallible(apply(&mut view, &send("a", 1, 1, 200, "y")));
    assert_eq!(outcome, Outcome::Rejected { reason: Rejection::SeqReused { conversation: "a".into() } });
    assert!(effects.is_empty());
    assert_eq!(view.apply(&send("a", 1, 1, 200, "y")), outcome);
    assert_eq!(view, before);
    assert_eq!(view.apply(&send("b", 1, 1, 300, "y")), appended(1, 300, false));
    assert_eq!(view.apply(&send("b", 1, 1, 300, "y")), appended(1, 300, true));
}

// Promise: the dedup key is (sender, client_id, client_seq), not any part of it: another
// client or another seq appends, and so does another user's identical pair, so nobody
// can suppress another user's message by sending its key first.
#[test]
fn dedup_key_is_sender_client_and_seq() {
    let mut view = MemView::default();
    assert_eq!(view.apply(&send("a", 1, 1, 10, "x")), appended(1, 10, false));
    assert_eq!(view.apply(&send("a", 2, 1, 20, "x")), appended(2, 20, false));
    assert_eq!(view.apply(&send("a", 1, 2, 30, "x")), appended(3, 30, false));
    assert!(matches!(view.apply(&add("a", "alice", "mallory")), Outcome::Members { .. }));
    assert!(matches!(view.apply(&add("a", "alice", "bob")), Outcome::Members { .. }));
    assert_eq!(view.apply(&send_as("a", "mallory", 5, 1, 40, "hijack")), appended(4, 40, false));
    assert_eq!(view.apply(&send_as("a", "bob", 5, 1, 50, "real")), appended(5, 50, false));
    assert_eq!(view.messages.len(), 5);
}

// ---------------------------------------------------------------------------------------
// Membership
// ---------------------------------------------------------------------------------------

// Promise: only members send, move cursors or change members; a removal is ordered at the
// head it was applied at, and a re-added user is a member again.
#[test]
fn only_members_act_and_a_removal_records_where_reading_ends() {
    let mut view = MemView::default();
    let create = members("room", "alice", Membership::Create { members: vec!["bob".into()] });
    assert_eq!(view.apply(&create), Outcome::Members { members: vec!["alice".into(), "bob".into()], head: 0 });
    assert_eq!(view.apply(&create), Outcome::Rejected { reason: Rejection::Exists });
    assert_eq!(view.apply(&send_as("room", "bob", 1, 1, 1, "hi")), appended(1, 1, false));
    let not_member = |user: &str| Outcome::Rejected { reason: Rejection::NotMember { user: user.into() } };
    assert_eq!(view.apply(&send_as("room", "eve", 2, 1, 2, "let me in")), not_member("eve"));
    assert_eq!(view.apply(&add("room", "eve", "eve")), not_member("eve"));
    assert_eq!(view.apply(&cursor("eve", "room", 1)), not_member("eve"));
    let removed = view.apply(&members("room", "alice", Membership::Remove { user: "bob".into() }));
    assert_eq!(removed, Outcome::Members { members: vec!["alice".into()], head: 1 });
    assert_eq!(view.members["room"].removed.get("bob"), Some(&1));
    assert_eq!(view.apply(&send_as("room", "bob", 1, 2, 3, "still here?")), not_member("bob"));
    // A retry of bob's earlier send still answers where it was stored.
    assert_eq!(view.apply(&send_as("room", "bob", 1, 1, 9, "hi")), appended(1, 1, true));
    assert!(matches!(view.apply(&add("room", "alice", "bob")), Outcome::Members { .. }));
    assert!(!view.members["room"].removed.contains_key("bob"));
    assert_eq!(view.apply(&send_as("room", "bob", 1, 2, 4, "back")), appended(2, 4, false));
    // A creator is always a member; a crowd over the limit is refused whole.
    assert_eq!(
        view.apply(&members("other", "ann", Membership::Create { members: vec![] })),
        Outcome::Members { members: vec!["ann".into()], head: 0 }
    );
    let crowd: Vec<String> = (0..MEMBERS_MAX).map(|i| format!("u{i}")).collect();
    assert_eq!(
        view.apply(&members("big", "ann", Membership::Create { members: crowd })),
        Outcome::Rejected { reason: Rejection::TooManyMembers { max: MEMBERS_MAX } }
    );
}

// The removals a conversation remembers are bounded: made-up users added and removed over
// and over do not grow its member record; the oldest removals are forgotten first, and a
// forgotten user reads as any non-member.
#[test]
fn a_conversation_remembers_at_most_removed_max_removals() {
    let mut view = view_with("room", 0);
    let create = members("room", "alice", Membership::Create { members: vec![] });
    assert!(matches!(view.apply(&create), Outcome::Members { .. }));
    let remove = |user: &str| members("room", "alice", Membership::Remove { user: user.into() });
    for i in 0..REMOVED_MAX + 10 {
        let user = format!("x{i}");
        assert!(matches!(view.apply(&add("room", "alice", &user)), Outcome::Members { .. }));
        // A message between removals, so that each removal has its own head.
        assert!(matches!(view.apply(&send_as("room", "alice", 1, i as u64, 1, "m")), Outcome::Appended { .. }));
        assert!(matches!(view.apply(&remove(&user)), Outcome::Members { .. }));
    }
    let removed = &view.members["room"].removed;
    assert_eq!(removed.len(), REMOVED_MAX);
    assert!(!removed.contains_key("x0") && !removed.contains_key("x9"), "the oldest are forgotten");
    assert_eq!(removed.get("x10"), Some(&11));
    assert_eq!(removed.get(&format!("x{}", REMOVED_MAX + 9)).copied(), Some((REMOVED_MAX + 10) as u64));
    assert_eq!(
        view.apply(&send_as("room", "x0", 2, 1, 2, "still in?")),
        Outcome::Rejected { reason: Rejection::NotMember { user: "x0".into() } }
    );
}

// Promise: a rejected send consumes nothing - not an offset, and not its client_seq.
#[test]
fn rejected_send_does_not_consume_seq_or_offset() {
    let mut view = MemView::default();
    let big = "x".repeat(MESSAGE_BYTES_MAX + 1);
    assert!(matches!(view.apply(&send("a", 1, 1, 10, &big)), Outcome::Rejected { .. }));
    assert!(is_invalid_id(&view.apply(&send_as("a", "", 1, 1, 10, "x"))));
    assert_eq!(view, MemView::default());
    assert_eq!(view.apply(&send("a", 1, 1, 20, "ok")), appended(1, 20, false));
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

// Promise: a body of exactly MESSAGE_BYTES_MAX bytes is accepted; one more byte is
// rejected TooLarge with the exact sizes, and nothing is stored.
#[test]
fn body_size_limit_is_exact() {
    let mut view = MemView::default();
    let max = "x".repeat(MESSAGE_BYTES_MAX);
    assert_eq!(view.apply(&send("a", 1, 1, 1, &max)), appended(1, 1, false));
    assert_eq!(view.messages[0].text.len(), MESSAGE_BYTES_MAX);

    let before = view.clone();
    let over = "x".repeat(MESSAGE_BYTES_MAX + 1);
    let (outcome, effects) = unwrap_infallible(apply(&mut view, &send("a", 1, 2, 2, &over)));
    assert_eq!(
        outcome,
        Outcome::Rejected { reason: Rejection::TooLarge { bytes: MESSAGE_BYTES_MAX + 1, max: MESSAGE_BYTES_MAX } }
    );
    assert!(effects.is_empty());
    view.apply(&send("a", 1, 2, 2, &over));
    assert_eq!(view, before);

    // An empty body is fine.
    assert_eq!(view.apply(&send("a", 1, 3, 3, "")), appended(2, 3, false));
}

// Promise: the body limit counts UTF-8 bytes, not chars.
#[test]
fn body_size_is_measured_in_utf8_bytes() {
    assert_eq!(MESSAGE_BYTES_MAX % 2, 0);
    let mut view = MemView::default();
    // 'é' is 2 bytes: MAX/2 of them is exactly MAX bytes.
    let exact = "é".repeat(MESSAGE_BYTES_MAX / 2);
    assert_eq!(exact.len(), MESSAGE_BYTES_MAX);
    assert_eq!(view.apply(&send("a", 1, 1, 1, &exact)), appended(1, 1, false));
    // '€' is 3 bytes: far fewer chars than MAX, yet over MAX bytes.
    let euros = "€".repeat(MESSAGE_BYTES_MAX / 3 + 1);
    assert!(euros.chars().count() < MESSAGE_BYTES_MAX);
    assert_eq!(
        view.apply(&send("a", 1, 2, 2, &euros)),
        Outcome::Rejected { reason: Rejection::TooLarge { bytes: euros.len(), max: MESSAGE_BYTES_MAX } }
    );
    // A 4-byte char pushing an exact-size body over the limit.
    let exact_plus = format!("{}😀", "x".repeat(MESSAGE_BYTES_MAX - 3));
    assert_eq!(exact_plus.len(), MESSAGE_BYTES_MAX + 1);
    assert!(matches!(
        view.apply(&send("a", 1, 3, 3, &exact_plus)),
        Outcome::Rejected { reason: Rejection::TooLarge { .. } }
    ));
    assert_eq!(view.messages.len(), 1);
}

/// Ids that must be rejected: empty, too long (in bytes), or containing control chars.
fn bad_ids() -> Vec<String> {
    vec![
        String::new(),
        "a".repeat(ID_BYTES_MAX + 1),
        "é".repeat(ID_BYTES_MAX / 2) + "x", // 129 bytes, 65 chars
        "€".repeat(43),                     // 129 bytes, 43 chars
        "a\nb".into(),
        "tab\there".into(),
        "\0".into(),
        "del\u{7f}".into(),
        "c1\u{85}".into(),
        "\u{1b}[31m".into(),
    ]
}

/// Ids that must be accepted, including exactly ID_BYTES_MAX bytes.
fn good_ids() -> Vec<String> {
    vec![
        "a".into(),
        "a".repeat(ID_BYTES_MAX),
        "é".repeat(ID_BYTES_MAX / 2), // 128 bytes, 64 chars
        "room with spaces/and:punct".into(),
        "日本語".into(),
    ]
}

// Promise: validate_id accepts 1..=128 bytes of UTF-8 without control chars, and
// measures length in bytes.
#[test]
fn validate_id_boundaries() {
    for id in bad_ids() {
        assert!(validate_id("user", &id).is_err(), "should reject {id:?}");
    }
    for id in good_ids() {
        assert_eq!(validate_id("user", &id), Ok(()), "should accept {id:?}");
    }
    assert!(validate_id("conversation", "").unwrap_err().contains("conversation"));
}

// Promise: invalid conversation or sender ids on a send are rejected InvalidId and
// change nothing; valid ones at the boundary are accepted.
#[test]
fn send_rejects_invalid_ids() {
    let mut view = view_with("ok", 1);
    let before = view.clone();
    for (i, id) in bad_ids().iter().enumerate() {
        let i = i as u64;
        assert!(is_invalid_id(&view.apply(&send_as(id, "alice", 1, i, 1, "x"))), "conversation {id:?}");
        assert!(is_invalid_id(&view.apply(&send_as("ok", id, 2, i, 1, "x"))), "sender {id:?}");
    }
    assert_eq!(view, before);
    for (i, id) in good_ids().iter().enumerate() {
        let i = i as u64;
        assert_eq!(view.apply(&send_as(id, "alice", 3, i, 1, "x")), appended(1, 1, false), "conversation {id:?}");
        assert!(matches!(view.apply(&add("ok", "alice", id)), Outcome::Members { .. }), "member {id:?}");
        assert!(matches!(view.apply(&send_as("ok", id, 4, i, 1, "x")), Outcome::Appended { duplicate: false, .. }));
    }
}

// Promise: invalid user or conversation ids on a cursor are rejected InvalidId and change
// nothing; boundary-valid ids work.
#[test]
fn cursor_rejects_invalid_ids() {
    let mut view = view_with("ok", 2);
    let before = view.clone();
    for id in bad_ids() {
        assert!(is_invalid_id(&view.apply(&cursor(&id, "ok", 1))), "user {id:?}");
        assert!(is_invalid_id(&view.apply(&cursor("alice", &id, 0))), "conversation {id:?}");
    }
    assert_eq!(view, before);
    let long_user = "u".repeat(ID_BYTES_MAX);
    view.apply(&add("ok", "alice", &long_user));
    assert_eq!(view.apply(&cursor(&long_user, "ok", 2)), Outcome::CursorAt { offset: 2 });
    assert_eq!(view.cursors.get(&(long_user, "ok".to_string())), Some(&2));
}

// ---------------------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------------------

// Promise: a cursor only moves forward; a lower or equal offset answers the current
// cursor and writes nothing.
#[test]
fn cursor_only_moves_forward() {
    let mut view = view_with("room", 5);
    assert_eq!(view.apply(&cursor("alice", "room", 3)), Outcome::CursorAt { offset: 3 });
    let at_three = view.clone();
    for lower in [0, 1, 2, 3] {
        let (outcome, effects) = unwrap_infallible(apply(&mut view, &cursor("alice", "room", lower)));
        assert_eq!(outcome, Outcome::CursorAt { offset: 3 }, "offset {lower}");
        assert!(effects.is_empty());
        view.apply(&cursor("alice", "room", lower));
    }
    assert_eq!(view, at_three);
    assert_eq!(view.apply(&cursor("alice", "room", 5)), Outcome::CursorAt { offset: 5 });
    assert_eq!(view.cursors.get(&("alice".to_string(), "room".to_string())), Some(&5));
}

// Promise: a forward cursor move emits exactly one SetCursor effect.
#[test]
fn cursor_forward_effect_is_exact() {
    let mut view = view_with("room", 4);
    view.apply(&add("room", "alice", "bob"));
    let (outcome, effects) = unwrap_infallible(apply(&mut view, &cursor("bob", "room", 4)));
    assert_eq!(outcome, Outcome::CursorAt { offset: 4 });
    assert_eq!(effects, vec![Effect::SetCursor { user: "bob".into(), conversation: "room".into(), offset: 4 }]);
}

// Promise: a cursor can reach the head but never pass it; passing is rejected with the
// current head and leaves the cursor where it was.
#[test]
fn cursor_cannot_pass_head() {
    let mut view = view_with("room", 3);
    assert_eq!(view.apply(&cursor("alice", "room", 2)), Outcome::CursorAt { offset: 2 });
    let before = view.clone();
    for past in [4, 5, u64::MAX] {
        assert_eq!(
            view.apply(&cursor("alice", "room", past)),
            Outcome::Rejected { reason: Rejection::CursorPastHead { head: 3 } }
        );
    }
    assert_eq!(view, before);
    assert_eq!(view.apply(&cursor("alice", "room", 3)), Outcome::CursorAt { offset: 3 });

    // An empty (unknown) conversation has head 0: cursor 0 is fine, 1 is past the head.
    assert_eq!(view.apply(&cursor("alice", "empty", 0)), Outcome::CursorAt { offset: 0 });
    assert_eq!(
        view.apply(&cursor("alice", "empty", 1)),
        Outcome::Rejected { reason: Rejection::CursorPastHead { head: 0 } }
    );
    assert!(!view.cursors.contains_key(&("alice".to_string(), "empty".to_string())));
}

// Promise: cursors are per (user, conversation).
#[test]
fn cursors_are_independent_per_user_and_conversation() {
    let mut view = view_with("a", 3);
    view.apply(&add("a", "alice", "bob"));
    for i in 0..3 {
        view.apply(&send("b", 2000, i, 0, "m"));
    }
    assert_eq!(view.apply(&cursor("alice", "a", 3)), Outcome::CursorAt { offset: 3 });
    assert_eq!(view.apply(&cursor("bob", "a", 1)), Outcome::CursorAt { offset: 1 });
    assert_eq!(view.apply(&cursor("alice", "b", 2)), Outcome::CursorAt { offset: 2 });
    assert_eq!(view.apply(&cursor("bob", "a", 0)), Outcome::CursorAt { offset: 1 });
    assert_eq!(view.cursors.len(), 3);
    assert_eq!(view.cursors[&("alice".to_string(), "a".to_string())], 3);
    assert_eq!(view.cursors[&("bob".to_string(), "a".to_string())], 1);
    assert_eq!(view.cursors[&("alice".to_string(), "b".to_string())], 2);
}

// ---------------------------------------------------------------------------------------
// Overlay
// ---------------------------------------------------------------------------------------

// Promise: within a batch, later commands see earlier effects (head, dedup, cursor) even
// though nothing has been written to the base yet; the base is only read.
#[test]
fn overlay_sees_earlier_effects_of_the_batch() {
    let mut base = view_with("room", 2);
    base.apply(&cursor("alice", "room", 1));
    let snapshot = base.clone();
    let batch = [
        send("room", 1, 1, 10, "x"),    // offset 3
        send("room", 1, 1, 11, "x"),    // duplicate of the previous one, from the overlay
        send("room", 1, 1, 12, "y"),    // key reused for another text, from the overlay
        cursor("alice", "room", 3),     // head 3 visible only through the overlay
        cursor("alice", "room", 2),     // answers 3, from the overlay
        send("room", 1000, 0, 13, "m"), // duplicate from the base
        send("room", 1, 2, 14, "x"),    // offset 4
    ];
    let expected = vec![
        appended(3, 10, false),
        appended(3, 10, true),
        Outcome::Rejected { reason: Rejection::SeqReused { conversation: "room".into() } },
        Outcome::CursorAt { offset: 3 },
        Outcome::CursorAt { offset: 3 },
        appended(1, 0, true),
        appended(4, 14, false),
    ];
    let mut all_effects = Vec::new();
    let mut outcomes = Vec::new();
    {
        let mut overlay = Overlay::new(&mut base);
        for command in &batch {
            let (outcome, effects) = unwrap_infallible(apply(&mut overlay, command));
            overlay.absorb(&effects);
            outcomes.push(outcome);
            all_effects.extend(effects);
        }
    }
    assert_eq!(outcomes, expected);
    assert_eq!(base, snapshot, "the overlay must not write to its base");
    persist(&mut base, all_effects);
    let mut sequential = snapshot;
    for command in &batch {
        sequential.apply(command);
    }
    assert_eq!(base, sequential);
}

// ---------------------------------------------------------------------------------------
// shard_of
// ---------------------------------------------------------------------------------------

// Promise: the reference FNV-1a used below matches the published FNV test vectors, so it
// is a trustworthy oracle.
#[test]
fn fnv_reference_matches_published_vectors() {
    assert_eq!(fnv1a64_reference(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64_reference(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64_reference(b"foobar"), 0x8594_4171_f739_67e8);
}

// Promise: shard_of is the specified FNV-1a 64 modulo the shard count; these literal
// values must never change across versions.
#[test]
fn shard_of_pinned_values() {
    assert_eq!(shard_of("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u32);
    assert_eq!(shard_of("", 16), 5);
    assert_eq!(shard_of("a", 1024), (0xaf63_dc4c_8601_ec8cu64 % 1024) as u32);
    assert_eq!(shard_of("a", 1024), 140);
    assert_eq!(shard_of("foobar", 7), (0x8594_4171_f739_67e8u64 % 7) as u32);
    assert_eq!(shard_of("foobar", u32::MAX), (0x8594_4171_f739_67e8u64 % u64::from(u32::MAX)) as u32);
    for id in ["", "a", "room-42", "日本語"] {
        assert_eq!(shard_of(id, 1), 0);
        // Stable across calls.
        assert_eq!(shard_of(id, 97), shard_of(id, 97));
    }
    // Hashes bytes, not chars: "é" is [0xc3, 0xa9].
    assert_eq!(shard_of("é", 1_000_003), (fnv1a64_reference(&[0xc3, 0xa9]) % 1_000_003) as u32);
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

const CONVERSATIONS: &[&str] = &["a", "b", "c"];
const USERS: &[&str] = &["u1", "u2", "u3"];

fn conversation_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop::sample::select(CONVERSATIONS).prop_map(str::to_string),
        1 => prop::sample::select(vec!["", "bad\n"]).prop_map(str::to_string),
    ]
}

fn user_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop::sample::select(USERS).prop_map(str::to_string),
        1 => Just(String::new()),
    ]
}

fn text_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => "[a-zé ]{0,6}",
        1 => Just("x".repeat(MESSAGE_BYTES_MAX + 1)),
    ]
}

fn send_strategy() -> impl Strategy<Value = SendCommand> {
    (conversation_strategy(), user_strategy(), 0u64..3, 0u64..4, 0u64..1000, text_strategy()).prop_map(
        |(conversation, sender, client_id, client_seq, ts_ms, text)| SendCommand {
            conversation,
            sender,
            client_id,
            client_seq,
            ts_ms,
            text,
        },
    )
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let cursor = (user_strategy(), conversation_strategy(), 0u64..8)
        .prop_map(|(user, conversation, offset)| Command::Cursor(CursorCommand { user, conversation, offset }));
    let change = prop_oneof![
        prop::collection::vec(user_strategy(), 0..3).prop_map(|members| Membership::Create { members }),
        user_strategy().prop_map(|user| Membership::Add { user }),
        user_strategy().prop_map(|user| Membership::Remove { user }),
    ];
    let members = (conversation_strategy(), user_strategy(), change)
        .prop_map(|(conversation, by, change)| Command::Members(MembersCommand { conversation, by, change }));
    let trim = (conversation_strategy(), 0u64..10)
        .prop_map(|(conversation, before)| Command::Trim(TrimCommand { conversation, before }));
    let limit = prop::option::of(0u64..4);
    // Planned under a policy drawn from the same few values the changes below set, so that it
    // is sometimes the current one and sometimes not.
    let trim_under = (conversation_strategy(), 0u64..10, limit.clone(), limit.clone()).prop_map(
        |(conversation, before, max_messages, max_bytes)| {
            let planned_under = Retention { max_messages, max_age_ms: None, max_bytes };
            Command::TrimUnder(TrimUnderCommand { trim: TrimCommand { conversation, before }, planned_under })
        },
    );
    let retention = (conversation_strategy(), user_strategy(), any::<bool>(), limit.clone(), limit).prop_map(
        |(conversation, by, admin, max_messages, max_bytes)| {
            let retention = Retention { max_messages, max_age_ms: None, max_bytes };
            Command::SetRetention(RetentionCommand { conversation, by, admin, retention })
        },
    );
    prop_oneof![
        3 => send_strategy().prop_map(Command::Send),
        1 => cursor,
        1 => members,
        1 => prop::collection::vec(send_strategy(), 0..6).prop_map(Command::SendBatch),
        1 => trim,
        1 => trim_under,
        1 => retention,
        // Sent to a shard by mistake: refused, nothing changes.
        1 => (0u32..4, 1u64..4).prop_map(|(shard, node)| {
            Command::Place(crate::placement::PlacementCommand::SetPreferredLeader { shard, node })
        }),
    ]
}

fn commands_strategy() -> impl Strategy<Value = Vec<Command>> {
    prop::collection::vec(command_strategy(), 0..60)
}

/// The id rule written independently: 1..=128 bytes, no char of Unicode category Cc
/// (U+0000..=U+001F and U+007F..=U+009F).
fn spec_valid_id(id: &str) -> bool {
    let control = |c: char| c <= '\u{1f}' || ('\u{7f}'..='\u{9f}').contains(&c);
    !id.is_empty() && id.len() <= 128 && !id.chars().any(control)
}

/// A deliberately naive model of the shard, written from the spec rather than from apply.
#[derive(Default)]
struct Model {
    messages: Vec<StoredMessage>,
    cursors: HashMap<(String, String), u64>,
    /// Members by conversation (absent: the conversation does not exist), and where each
    /// removed user's reading ended.
    members: HashMap<String, (std::collections::BTreeSet<String>, HashMap<String, u64>)>,
    /// The last offset given out per conversation (trimmed messages keep theirs used).
    heads: HashMap<String, u64>,
    /// The first offset kept per conversation (absent: 1).
    earliest: HashMap<String, u64>,
    retention: HashMap<String, Retention>,
}

impl Model {
    fn apply(&mut self, command: &Command) -> Outcome {
        let reject = |reason| Outcome::Rejected { reason };
        match command {
            Command::Send(s) => {
                // The exact InvalidId message is apply's business; only the kind is compared.
                if !spec_valid_id(&s.conversation) || !spec_valid_id(&s.sender) {
                    return reject(Rejection::InvalidId(String::new()));
                }
                if s.text.len() > MESSAGE_BYTES_MAX {
                    return reject(Rejection::TooLarge { bytes: s.text.len(), max: MESSAGE_BYTES_MAX });
                }
                if let Some(m) = self.messages.iter().find(|m| {
                    m.conversation == s.conversation
                        && m.sender == s.sender
                        && m.client_id == s.client_id
                        && m.client_seq == s.client_seq
                }) {
                    if m.text != s.text {
                        return reject(Rejection::SeqReused { conversation: m.conversation.clone() });
                    }
                    return Outcome::Appended { offset: m.offset, ts_ms: m.ts_ms, duplicate: true };
                }
                match self.members.get(&s.conversation) {
                    Some((users, _)) if !users.contains(&s.sender) => {
                        return reject(Rejection::NotMember { user: s.sender.clone() })
                    }
                    Some(_) => {}
                    None => {
                        self.members.insert(s.conversation.clone(), ([s.sender.clone()].into(), HashMap::new()));
                    }
                }
                let offset = self.count(&s.conversation) + 1;
                self.heads.insert(s.conversation.clone(), offset);
                self.messages.push(StoredMessage {
                    conversation: s.conversation.clone(),
                    offset,
                    sender: s.sender.clone(),
                    ts_ms: s.ts_ms,
                    client_id: s.client_id,
                    client_seq: s.client_seq,
                    text: s.text.clone(),
                });
                Outcome::Appended { offset, ts_ms: s.ts_ms, duplicate: false }
            }
            Command::Cursor(c) => {
                if !spec_valid_id(&c.user) || !spec_valid_id(&c.conversation) {
                    return reject(Rejection::InvalidId(String::new()));
                }
                if self.members.get(&c.conversation).is_some_and(|(users, _)| !users.contains(&c.user)) {
                    return reject(Rejection::NotMember { user: c.user.clone() });
                }
                let head = self.count(&c.conversation);
                if c.offset > head {
                    return reject(Rejection::CursorPastHead { head });
                }
                let slot = self.cursors.entry((c.user.clone(), c.conversation.clone())).or_insert(0);
                *slot = (*slot).max(c.offset);
                Outcome::CursorAt { offset: *slot }
            }
            // By the spec, a batch is its sends one after another.
            Command::SendBatch(sends) => {
                Outcome::Batch(sends.iter().map(|s| self.apply(&Command::Send(s.clone()))).collect())
            }
            Command::Members(m) => {
                let named: Vec<&String> = match &m.change {
                    Membership::Create { members } => members.iter().collect(),
                    Membership::Add { user } | Membership::Remove { user } => vec![user],
                };
                if !spec_valid_id(&m.conversation) || !spec_valid_id(&m.by) || named.iter().any(|u| !spec_valid_id(u)) {
                    return reject(Rejection::InvalidId(String::new()));
                }
                let head = self.count(&m.conversation);
                let current = self.members.get(&m.conversation).cloned();
                let (users, removed) = match (&m.change, current) {
                    (Membership::Create { members }, None) if head == 0 => {
                        let users: std::collections::BTreeSet<String> =
                            members.iter().cloned().chain([m.by.clone()]).collect();
                        (users, HashMap::new())
                    }
                    (Membership::Create { .. }, _) => return reject(Rejection::Exists),
                    (_, None) => return reject(Rejection::NotMember { user: m.by.clone() }),
                    (_, Some((users, _))) if !users.contains(&m.by) => {
                        return reject(Rejection::NotMember { user: m.by.clone() })
                    }
                    (Membership::Add { user }, Some((mut users, mut removed))) => {
                        users.insert(user.clone());
                        removed.remove(user);
                        (users, removed)
                    }
                    (Membership::Remove { user }, Some((mut users, mut removed))) => {
                        if users.remove(user) {
                            removed.insert(user.clone(), head);
                        }
                        (users, removed)
                    }
                };
                let listed = users.iter().cloned().collect();
                self.members.insert(m.conversation.clone(), (users, removed));
                Outcome::Members { members: listed, head }
            }
            Command::SetRetention(r) => {
                if !spec_valid_id(&r.conversation) || !spec_valid_id(&r.by) {
                    return reject(Rejection::InvalidId(String::new()));
                }
                let limits = [r.retention.max_messages, r.retention.max_age_ms, r.retention.max_bytes];
                if limits.contains(&Some(0)) {
                    return reject(Rejection::InvalidRetention(String::new()));
                }
                match self.members.get(&r.conversation) {
                    Some((users, _)) if users.contains(&r.by) || r.admin => {}
                    Some(_) => return reject(Rejection::NotMember { user: r.by.clone() }),
                    None if r.admin => {}
                    None => {
                        self.members.insert(r.conversation.clone(), ([r.by.clone()].into(), HashMap::new()));
                    }
                }
                self.retention.insert(r.conversation.clone(), r.retention);
                Outcome::RetentionSet { retention: r.retention }
            }
            Command::Trim(t) => {
                if !spec_valid_id(&t.conversation) {
                    return reject(Rejection::InvalidId(String::new()));
                }
                let from = self.earliest.get(&t.conversation).copied().unwrap_or(1);
                let before = t.before.min(self.count(&t.conversation) + 1).min(from + TRIM_MESSAGES_MAX);
                if before <= from {
                    return Outcome::Trimmed { earliest: from, deleted: 0 };
                }
                self.messages.retain(|m| m.conversation != t.conversation || m.offset >= before);
                self.earliest.insert(t.conversation.clone(), before);
                Outcome::Trimmed { earliest: before, deleted: before - from }
            }
            // A trim planned under another policy than the conversation's own now deletes
            // nothing; under the same one it is a trim.
            Command::TrimUnder(t) => {
                if !spec_valid_id(&t.trim.conversation) {
                    return reject(Rejection::InvalidId(String::new()));
                }
                if self.retention.get(&t.trim.conversation).copied().unwrap_or_default() != t.planned_under {
                    let earliest = self.earliest.get(&t.trim.conversation).copied().unwrap_or(1);
                    return Outcome::Trimmed { earliest, deleted: 0 };
                }
                self.apply(&Command::Trim(t.trim.clone()))
            }
            // A shard's group refuses placement commands; only the metadata group applies them.
            Command::Place(_) => reject(Rejection::Placement(String::new())),
        }
    }

    /// The conversation's head: the last offset given out.
    fn count(&self, conversation: &str) -> u64 {
        self.heads.get(conversation).copied().unwrap_or(0)
    }
}

/// Outcome equality where the InvalidId message text is not compared.
fn same_outcome(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (
            Outcome::Rejected { reason: Rejection::InvalidId(_) },
            Outcome::Rejected { reason: Rejection::InvalidId(_) },
        )
        | (
            Outcome::Rejected { reason: Rejection::InvalidRetention(_) },
            Outcome::Rejected { reason: Rejection::InvalidRetention(_) },
        )
        | (
            Outcome::Rejected { reason: Rejection::Placement(_) },
            Outcome::Rejected { reason: Rejection::Placement(_) },
        ) => true,
        (Outcome::Batch(x), Outcome::Batch(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_outcome(a, b))
        }
        _ => a == b,
    }
}

/// Checks the stored-state invariants of a MemView.
fn check_invariants(view: &MemView) -> Result<(), TestCaseError> {
    // Offsets of every conversation are exactly earliest..=head (earliest is 1 until a
    // trim), in append order.
    let mut by_conversation: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in &view.messages {
        by_conversation.entry(&m.conversation).or_default().push(m.offset);
    }
    prop_assert!(by_conversation.keys().all(|c| view.heads.contains_key(*c)));
    for (conversation, head) in &view.heads {
        let offsets = by_conversation.get(conversation.as_str()).cloned().unwrap_or_default();
        let earliest = view.earliest.get(conversation).copied().unwrap_or(1);
        prop_assert!(earliest <= head + 1, "{:?}: earliest {} past the head {}", conversation, earliest, head);
        prop_assert_eq!(offsets, (earliest..=*head).collect::<Vec<u64>>(), "conversation {:?}", conversation);
    }
    // No idempotency key is stored twice, and the dedup index matches messages.
    let mut seen = HashSet::new();
    for m in &view.messages {
        let key = DedupKey {
            conversation: m.conversation.clone(),
            sender: m.sender.clone(),
            client_id: m.client_id,
            client_seq: m.client_seq,
        };
        prop_assert!(seen.insert(key.clone()), "key {:?} stored twice", key);
        let record = DedupRecord { offset: m.offset, ts_ms: m.ts_ms, digest: text_digest(&m.text) };
        prop_assert_eq!(view.dedup.get(&key), Some(&record));
    }
    prop_assert_eq!(view.dedup.len(), view.messages.len());
    // Every conversation with messages has members; every sender was a member when it sent
    // (checked by the model test), and members are valid ids.
    for conversation in view.heads.keys() {
        prop_assert!(view.members.contains_key(conversation), "{:?} has messages but no members", conversation);
    }
    for m in view.members.values() {
        prop_assert!(m.users.len() <= MEMBERS_MAX);
        prop_assert!(m.users.iter().all(|u| validate_id("user", u).is_ok()));
    }
    // Every cursor is within its conversation's head, and only valid ids are stored.
    for ((user, conversation), offset) in &view.cursors {
        prop_assert!(*offset <= view.heads.get(conversation).copied().unwrap_or(0));
        prop_assert!(validate_id("user", user).is_ok());
    }
    for m in &view.messages {
        prop_assert!(validate_id("conversation", &m.conversation).is_ok());
        prop_assert!(validate_id("user", &m.sender).is_ok());
        prop_assert!(m.text.len() <= MESSAGE_BYTES_MAX);
    }
    Ok(())
}

fn trim(conversation: &str, before: u64) -> Command {
    Command::Trim(TrimCommand { conversation: conversation.into(), before })
}

fn set_retention(conversation: &str, by: &str, admin: bool, max_messages: Option<u64>) -> Command {
    let retention = Retention { max_messages, ..Retention::default() };
    Command::SetRetention(RetentionCommand { conversation: conversation.into(), by: by.into(), admin, retention })
}

#[test]
fn a_trim_deletes_a_prefix_and_its_dedup_records_and_never_reuses_an_offset() {
    let mut view = view_with("c", 10);
    assert_eq!(view.apply(&trim("c", 4)), Outcome::Trimmed { earliest: 4, deleted: 3 });
    assert_eq!(view.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), (4..=10).collect::<Vec<_>>());
    assert_eq!(view.dedup.len(), 7, "the three trimmed messages' records went with them");
    // A trim at or below the earliest does nothing; one past the head stops at the head.
    assert_eq!(view.apply(&trim("c", 2)), Outcome::Trimmed { earliest: 4, deleted: 0 });
    assert_eq!(view.apply(&trim("c", 1_000)), Outcome::Trimmed { earliest: 11, deleted: 7 });
    assert!(view.messages.is_empty() && view.dedup.is_empty());
    // The head stays: the next message is 11, and a retry of a trimmed key is a new message
    // (the dedup window is what is retained).
    assert_eq!(view.apply(&send("c", 1000, 0, 99, "m")), appended(11, 99, false));
    assert_eq!(view.apply(&send("c", 1000, 11, 100, "new")), appended(12, 100, false));
    // Another conversation is untouched, and a conversation that never had messages neither.
    assert_eq!(view.apply(&trim("empty", 5)), Outcome::Trimmed { earliest: 1, deleted: 0 });
}

#[test]
fn one_trim_deletes_at_most_its_bound() {
    let mut view = view_with("c", TRIM_MESSAGES_MAX + 10);
    let max = TRIM_MESSAGES_MAX;
    assert_eq!(view.apply(&trim("c", max + 10)), Outcome::Trimmed { earliest: max + 1, deleted: max });
    assert_eq!(view.apply(&trim("c", max + 10)), Outcome::Trimmed { earliest: max + 10, deleted: 9 });
}

#[test]
fn retention_is_set_by_members_and_admins_only() {
    let mut view = view_with("c", 1);
    let by_stranger = view.apply(&set_retention("c", "stranger", false, Some(5)));
    assert_eq!(by_stranger, Outcome::Rejected { reason: Rejection::NotMember { user: "stranger".into() } });
    let zero = view.apply(&set_retention("c", "stranger", true, Some(0)));
    assert!(matches!(zero, Outcome::Rejected { reason: Rejection::InvalidRetention(_) }), "{zero:?}");
    let five = Retention { max_messages: Some(5), ..Retention::default() };
    assert_eq!(view.apply(&set_retention("c", "admin", true, Some(5))), Outcome::RetentionSet { retention: five });
    assert!(!view.members["c"].contains("admin"), "an admin sets it without joining");
    // On a conversation that does not exist, an admin creates nothing; a user creates it
    // with themselves as its only member, as a first send would.
    view.apply(&set_retention("new", "admin", true, Some(5)));
    assert!(!view.members.contains_key("new"));
    view.apply(&set_retention("mine", "ann", false, Some(5)));
    assert_eq!(view.members["mine"].users.iter().collect::<Vec<_>>(), vec!["ann"]);
    assert_eq!(view.retention["mine"], five);
}

proptest! {
    // Promise: applying a batch through an Overlay (apply, absorb, next) gives the same
    // outcomes as applying the commands one by one, leaves the base untouched, and its
    // effects, once persisted, give the same state.
    #[test]
    fn overlay_batch_matches_sequential_apply(prefix in commands_strategy(), batch in commands_strategy()) {
        let mut base = MemView::default();
        for command in &prefix {
            base.apply(command);
        }
        let mut sequential = base.clone();
        let expected: Vec<Outcome> = batch.iter().map(|c| sequential.apply(c)).collect();

        let snapshot = base.clone();
        let mut outcomes = Vec::new();
        let mut all_effects = Vec::new();
        {
            let mut overlay = Overlay::new(&mut base);
            for command in &batch {
                let (outcome, effects) = unwrap_infallible(apply(&mut overlay, command));
                overlay.absorb(&effects);
                outcomes.push(outcome);
                all_effects.extend(effects);
            }
        }
        prop_assert_eq!(&outcomes, &expected);
        prop_assert_eq!(&base, &snapshot);
        persist(&mut base, all_effects);
        prop_assert_eq!(base, sequential);
    }

    // Promise: a SendBatch entry is exactly its sends applied one by one: the same
    // outcomes in order (offsets, duplicates within and across batches, rejections) and,
    // once its effects are persisted, the same state.
    #[test]
    fn send_batch_matches_separate_sends(prefix in commands_strategy(), batch in commands_strategy()) {
        let mut base = MemView::default();
        for command in &prefix {
            base.apply(command);
        }
        let sends: Vec<SendCommand> = batch
            .iter()
            .filter_map(|c| match c {
                Command::Send(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let mut sequential = base.clone();
        let expected: Vec<Outcome> = sends.iter().map(|s| sequential.apply(&Command::Send(s.clone()))).collect();

        let (outcome, effects) = unwrap_infallible(apply(&mut base, &Command::SendBatch(sends)));
        prop_assert_eq!(outcome, Outcome::Batch(expected));
        persist(&mut base, effects);
        prop_assert_eq!(base, sequential);
    }

    // Promise: apply is deterministic - two replicas fed the same commands end identical
    // with identical outcomes - and the stored state keeps its invariants after every step:
    // dense offsets 1..=head, no pair stored twice, cursors within head and monotonic.
    #[test]
    fn replicas_converge_and_invariants_hold(commands in commands_strategy()) {
        let mut one = MemView::default();
        let mut two = MemView::default();
        let mut cursors_before: HashMap<(String, String), u64> = HashMap::new();
        let mut outcomes_one = Vec::new();
        for command in &commands {
            outcomes_one.push(one.apply(command));
            check_invariants(&one)?;
            for (key, offset) in &one.cursors {
                prop_assert!(*offset >= cursors_before.get(key).copied().unwrap_or(0), "cursor moved back");
            }
            prop_assert!(cursors_before.keys().all(|k| one.cursors.contains_key(k)));
            cursors_before = one.cursors.clone();
        }
        let outcomes_two: Vec<Outcome> = commands.iter().map(|c| two.apply(c)).collect();
        prop_assert_eq!(&outcomes_one, &outcomes_two);
        prop_assert_eq!(&one, &two);
    }

    // Promise: apply agrees with a naive model of the spec on every outcome and on the
    // stored messages and cursors.
    #[test]
    fn apply_matches_naive_model(commands in commands_strategy()) {
        let mut view = MemView::default();
        let mut model = Model::default();
        for command in &commands {
            let got = view.apply(command);
            let want = model.apply(command);
            prop_assert!(same_outcome(&got, &want), "{}: got {:?}, model {:?}", command, got, want);
        }
        prop_assert_eq!(&view.messages, &model.messages);
        prop_assert_eq!(&view.retention, &model.retention);
        let earliest = |m: &HashMap<String, u64>| m.iter().filter(|(_, e)| **e > 1).map(|(c, e)| (c.clone(), *e)).collect::<HashMap<_, _>>();
        prop_assert_eq!(earliest(&view.earliest), earliest(&model.earliest));
        // The model stores zero cursors for no-op moves; compare only non-zero positions.
        let model_cursors: HashMap<_, _> = model.cursors.into_iter().filter(|(_, o)| *o > 0).collect();
        let view_cursors: HashMap<_, _> = view.cursors.clone().into_iter().filter(|(_, o)| *o > 0).collect();
        prop_assert_eq!(view_cursors, model_cursors);
    }

    // Promise: a retry of any appended command that is still retained, at any later point,
    // answers the original offset and ts as a duplicate and stores nothing (the dedup window
    // is the retained messages).
    #[test]
    fn retry_of_any_send_is_a_duplicate(commands in commands_strategy(), pick in any::<prop::sample::Index>()) {
        let mut view = MemView::default();
        let mut appended_sends = Vec::new();
        for command in &commands {
            if let (Outcome::Appended { offset, ts_ms, duplicate: false }, Command::Send(s)) = (view.apply(command), command) {
                appended_sends.push((s.clone(), offset, ts_ms));
            }
        }
        appended_sends.retain(|(s, offset, _)| *offset >= view.earliest.get(&s.conversation).copied().unwrap_or(1));
        prop_assume!(!appended_sends.is_empty());
        let (mut retry, offset, ts_ms) = appended_sends[pick.index(appended_sends.len())].clone();
        retry.ts_ms = retry.ts_ms.wrapping_add(1);
        let before = view.clone();
        prop_assert_eq!(view.apply(&Command::Send(retry)), Outcome::Appended { offset, ts_ms, duplicate: true });
        prop_assert_eq!(view, before);
    }

    // Promise: shard_of is FNV-1a 64 of the UTF-8 bytes modulo the count, always < count.
    #[test]
    fn shard_of_matches_reference_and_is_in_range(id in any::<String>(), shards in 1u32..=1024) {
        let shard = shard_of(&id, shards);
        prop_assert!(shard < shards);
        prop_assert_eq!(u64::from(shard), fnv1a64_reference(id.as_bytes()) % u64::from(shards));
    }

    // Promise: validate_id accepts exactly the non-empty, <=128-byte, control-free strings.
    #[test]
    fn validate_id_matches_spec(id in "(\\PC|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]){0,70}") {
        prop_assert_eq!(validate_id("user", &id).is_ok(), spec_valid_id(&id));
    }
}
