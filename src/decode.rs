//! The one way convoy decodes bytes it did not just encode itself: bincode 2 with a decode
//! limit.
//!
//! bincode allocates a `String` or `Vec` of the length its prefix announces before it
//! checks that the input holds that many bytes. Without a limit, a 15-byte frame whose
//! string announces 2^50 bytes makes the allocation fail and the process abort. With one,
//! bincode refuses any length whose allocation would pass the limit, before allocating. The
//! limit follows the size of the input in steps (bincode takes it as a const parameter):
//! what a body of `n` bytes may make bincode allocate is bounded by a small multiple of `n`
//! (a decoded value is larger in memory than on the wire, by at most the
//! [`EXPANSION_MAX`] factor that the steps leave room for).

use bincode::error::DecodeError;
use serde::de::DeserializeOwned;

/// How much larger in memory than on the wire a decoded value may be (a `Vec<u64>` of
/// one-byte varints is 8×; every convoy message is far below 16×).
pub const EXPANSION_MAX: usize = 16;

/// Decodes one bincode 2 (standard configuration) value from the front of `bytes`, refusing
/// any length prefix whose allocation would exceed [`EXPANSION_MAX`] × the input's size
/// class. Returns the value and the bytes it used.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), DecodeError> {
    let standard = bincode::config::standard();
    const KIB_64: usize = 64 << 10;
    const MIB_4: usize = 4 << 20;
    const MIB_64: usize = 64 << 20;
    let len = bytes.len();
    if len <= KIB_64 {
        bincode::serde::decode_from_slice(bytes, standard.with_limit::<{ EXPANSION_MAX * KIB_64 }>())
    } else if len <= MIB_4 {
        bincode::serde::decode_from_slice(bytes, standard.with_limit::<{ EXPANSION_MAX * MIB_4 }>())
    } else if len <= MIB_64 {
        bincode::serde::decode_from_slice(bytes, standard.with_limit::<{ EXPANSION_MAX * MIB_64 }>())
    } else {
        Err(DecodeError::Other("input over 64 MiB: larger than any convoy frame or record"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bincode's varint for a u64 that needs all eight bytes: the 253 marker, then LE.
    fn varint_u64(n: u64) -> Vec<u8> {
        let mut out = vec![253];
        out.extend_from_slice(&n.to_le_bytes());
        out
    }

    #[test]
    fn a_lying_length_prefix_is_refused_before_allocating() {
        for announced in [1u64 << 32, 1 << 50, 1 << 63, u64::MAX] {
            let bytes = varint_u64(announced);
            assert!(from_slice::<String>(&bytes).is_err(), "a string announcing {announced} bytes");
            assert!(from_slice::<Vec<u8>>(&bytes).is_err(), "bytes announcing {announced}");
            assert!(from_slice::<Vec<(String, u64)>>(&bytes).is_err(), "a sequence announcing {announced}");
        }
    }

    #[test]
    fn honest_values_round_trip_in_every_size_class() {
        for len in [0, 1, 100, 70_000, 5 << 20] {
            let text = "x".repeat(len);
            let bytes = bincode::serde::encode_to_vec(&text, bincode::config::standard()).expect("encode");
            let (back, used): (String, usize) = from_slice(&bytes).expect("decode");
            assert_eq!((back.len(), used), (len, bytes.len()));
        }
    }
}
