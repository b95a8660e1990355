//! Catch-up frames straight from stored bytes: a catch-up serves thousands of messages per
//! read, and decoding each stored message only to encode it again was most of its cost. This
//! is the one place that knows both formats (`store::codec` and `net::wire`); a unit test
//! checks its output against `frame::encode`.

use crate::chat::StoredMessage;
use crate::error::{Error, Result};
use crate::net::frame::{self, WIRE_VERSION};
use crate::net::wire::Response;
use crate::store::codec::{self, DISK_FORMAT};

/// Appends to `out` the frame of `Response::Message(m)` for a message `m` stored as
/// [`crate::store::codec`] wrote it — without decoding and re-encoding it. Both formats are
/// bincode 2 (standard config) behind one version byte, so the frame body is the wire
/// version, the bytes bincode puts before a `Message`'s payload (its variant tag), and the
/// stored bytes after their format byte. A catch-up serves thousands of messages per read,
/// and this is most of its cost. Checked against `frame::encode` by a unit test.
pub fn message_frame_from_stored(stored: &[u8], out: &mut Vec<u8>) -> Result<()> {
    use std::sync::OnceLock;
    static TAG: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let tag = TAG.get_or_init(|| {
        let sample = StoredMessage {
            conversation: String::new(),
            offset: 0,
            sender: String::new(),
            ts_ms: 0,
            client_id: 0,
            client_seq: 0,
            text: String::new(),
        };
        let cfg = bincode::config::standard();
        let whole = bincode::serde::encode_to_vec(Response::Message(sample.clone()), cfg).ok()?;
        let inner = bincode::serde::encode_to_vec(&sample, cfg).ok()?;
        whole.ends_with(&inner).then(|| whole[..whole.len() - inner.len()].to_vec())
    });
    let body = match stored.split_first() {
        Some((&DISK_FORMAT, body)) => body,
        _ => return Err(Error::Corrupt("stored message of an unknown format".into())),
    };
    match tag {
        Some(tag) => {
            let len = 1 + tag.len() + body.len();
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.push(WIRE_VERSION);
            out.extend_from_slice(tag);
            out.extend_from_slice(body);
        }
        // Not reachable with bincode's enum encoding; decode and encode if it ever changes.
        None => {
            let m: StoredMessage = codec::decode(stored)?;
            out.extend_from_slice(&frame::encode(&Response::Message(m)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_message_frames_equal_encoded_responses() {
        for (i, text) in ["", "hi", &"é".repeat(300), &"x".repeat(70_000)].into_iter().enumerate() {
            let m = StoredMessage {
                conversation: format!("conv-{i}"),
                offset: 1 + (i as u64) * 1_000_003,
                sender: "alice".into(),
                ts_ms: 1_795_000_000_000 + i as u64,
                client_id: u64::MAX - i as u64,
                client_seq: 300 + i as u64,
                text: text.to_string(),
            };
            let mut raw = Vec::new();
            message_frame_from_stored(&codec::encode(&m), &mut raw).expect("a stored message");
            assert_eq!(raw, frame::encode(&Response::Message(m)));
        }
        let mut out = Vec::new();
        assert!(message_frame_from_stored(&[9, 1, 2], &mut out).is_err(), "an unknown format is an error");
        assert!(message_frame_from_stored(&[], &mut out).is_err());
        assert!(out.is_empty());
    }
}
