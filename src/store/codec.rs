//! The on-disk value format: one format-version byte, then bincode 2 (standard config,
//! serde). Every persisted record goes through [`encode`] / [`decode`], so a future format
//! can be introduced by bumping [`DISK_FORMAT`] and decoding both.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Format version of every value convoy writes to RocksDB.
pub const DISK_FORMAT: u8 = 1;

/// Encodes a value with its version byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![DISK_FORMAT];
    // Encoding into a Vec cannot fail for our plain data types (no maps with non-string keys
    // that bincode rejects, no unsized sequences).
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("bincode encoding of an in-memory value into a Vec cannot fail");
    out.extend_from_slice(&body);
    out
}

/// Decodes a value written by [`encode`]; an unknown version or trailing bytes is an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, std::io::Error> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    match bytes.first() {
        Some(&DISK_FORMAT) => {}
        Some(v) => return Err(invalid(format!("unknown on-disk format version {v}"))),
        None => return Err(invalid("empty record".into())),
    }
    let (value, used) = crate::decode::from_slice(&bytes[1..]).map_err(|e| invalid(format!("corrupt record: {e}")))?;
    if used != bytes.len() - 1 {
        return Err(invalid(format!("corrupt record: {} trailing bytes", bytes.len() - 1 - used)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{DedupRecord, StoredMessage};
    use proptest::prelude::*;

    proptest! {
        // Every stored message decodes to exactly what was encoded.
        #[test]
        fn message_round_trips(conv in "\\PC{1,20}", sender in "\\PC{1,20}", text in "\\PC{0,200}", o in any::<u64>(), ts in any::<u64>(), cid in any::<u64>(), seq in any::<u64>()) {
            let m = StoredMessage { conversation: conv, offset: o, sender, ts_ms: ts, client_id: cid, client_seq: seq, text };
            prop_assert_eq!(decode::<StoredMessage>(&encode(&m)).expect("decodes"), m);
        }

        // Truncated or bit-flipped version bytes are errors, never a wrong value or a panic.
        #[test]
        fn damaged_records_are_errors(text in "[a-z]{1,10}", o in any::<u64>(), cut in 0usize..10) {
            let r = DedupRecord { offset: o, ts_ms: 5, digest: crate::chat::text_digest(&text) };
            let bytes = encode(&r);
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(decode::<DedupRecord>(&bytes[..cut]).is_err());
            let mut wrong = bytes.clone();
            wrong[0] = 9;
            prop_assert!(decode::<DedupRecord>(&wrong).is_err());
            let mut longer = bytes;
            longer.push(0);
            prop_assert!(decode::<DedupRecord>(&longer).is_err());
        }
    }
}
