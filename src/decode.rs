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

/// How the error of a sequence longer than its bound ([`at_most`]) begins.
pub const OVER_BOUND: &str = "a list of more than";

/// What `e` says, if it is a sequence longer than its bound ([`at_most`]).
pub fn over_bound(e: &DecodeError) -> Option<&str> {
    match e {
        DecodeError::OtherString(m) if m.starts_with(OVER_BOUND) => Some(m),
        _ => None,
    }
}

/// Deserializes a sequence of at most `MAX` elements (`#[serde(deserialize_with =
/// "crate::decode::at_most::<_, _, MAX>")]`), refusing it at element `MAX + 1`, before more is
/// decoded, and reserving room for at most `MAX` up front whatever length it announces.
///
/// The decode limit bounds the bytes a length prefix may claim, counted at their encoded
/// width: an empty string is one byte on the wire and 24 in memory, an empty send five and
/// 88, and a growing `Vec` keeps up to as much again spare. So a 1 MiB frame of 200,000
/// empty sends would cost over 20 MiB before a count checked after decoding refused it; a
/// count checked while decoding costs what `MAX` elements cost. The encoding is unchanged.
///
/// Its error begins with [`OVER_BOUND`], so a frame decoder can answer it as invalid input (a
/// list too long) rather than as a malformed frame.
pub fn at_most<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct AtMost<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for AtMost<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX} elements")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if seq.size_hint().is_some_and(|n| n > MAX) {
                return Err(serde::de::Error::custom(format_args!("{OVER_BOUND} {MAX} elements")));
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::custom(format_args!("{OVER_BOUND} {MAX} elements")));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_seq(AtMost::<T, MAX>(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Few(#[serde(deserialize_with = "at_most::<_, _, 3>")] Vec<String>);

    /// A bounded sequence decodes as any other up to its bound, and is refused past it,
    /// however its length prefix is set.
    #[test]
    fn a_bounded_sequence_is_refused_past_its_bound() {
        let encode = |v: &Vec<String>| bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("encode");
        for n in 0..=3 {
            let v: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let (back, _): (Few, usize) = from_slice(&encode(&v)).expect("within the bound");
            assert_eq!(back.0, v);
        }
        let four: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let e = from_slice::<Few>(&encode(&four)).expect_err("past the bound");
        assert_eq!(over_bound(&e), Some("a list of more than 3 elements"), "{e}");
        // A prefix announcing a million empty strings is refused as over the bound from the
        // prefix alone, not at the end of the input (only four of them are there).
        let mut many = varint_u64(1_000_000);
        many.resize(many.len() + 4, 0);
        let e = from_slice::<Few>(&many).expect_err("over the bound");
        assert!(over_bound(&e).is_some(), "{e}");
    }

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
