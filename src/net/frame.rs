//! Length-prefixed, size-checked frames: the only way bytes cross a QUIC stream.
//!
//! `length (u32 BE, counts what follows) ‖ version (u8) ‖ bincode 2 body`.
//! The length is checked against the reader's limit before any allocation, so an oversized
//! or hostile frame costs nothing but its rejection. A clean end of stream before a frame
//! starts is `Ok(None)`; an end inside a frame is an error.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

/// Version byte of every frame.
pub const WIRE_VERSION: u8 = 1;

/// Encodes a frame (length, version, body).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("bincode encoding of an in-memory message into a Vec cannot fail");
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    out.push(WIRE_VERSION);
    out.extend_from_slice(&body);
    out
}

/// Decodes a frame's version byte and body (everything after the length).
pub fn decode_body<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    match payload.first() {
        Some(&WIRE_VERSION) => {}
        Some(v) => {
            return Err(Error::Protocol(format!("unsupported wire version {v} (this build speaks {WIRE_VERSION})")))
        }
        None => return Err(Error::Protocol("empty frame".into())),
    }
    let (value, used) = bincode::serde::decode_from_slice(&payload[1..], bincode::config::standard())
        .map_err(|e| Error::Protocol(format!("malformed frame: {e}")))?;
    if used + 1 != payload.len() {
        return Err(Error::Protocol("malformed frame: trailing bytes".into()));
    }
    Ok(value)
}

/// Writes one frame.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, value: &T) -> Result<()> {
    let bytes = encode(value);
    w.write_all(&bytes).await.map_err(|e| Error::Unavailable(format!("write: {e}")))?;
    Ok(())
}

/// Reads one frame of at most `max_bytes`; `Ok(None)` on a clean end of stream.
pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R, max_bytes: usize) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await.map_err(|e| Error::Unavailable(format!("read: {e}")))?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(Error::Protocol("stream ended inside a frame header".into())) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(Error::Protocol("empty frame".into()));
    }
    if len > max_bytes {
        return Err(Error::InvalidInput(format!("frame of {len} bytes exceeds the limit of {max_bytes}")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| Error::Protocol(format!("stream ended inside a frame: {e}")))?;
    decode_body(&payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn round_trip_and_clean_end() {
        let mut buf = Vec::new();
        write(&mut buf, &("hello".to_string(), 42u64)).await.expect("write");
        write(&mut buf, &7u32).await.expect("write");
        let mut r = buf.as_slice();
        let a: Option<(String, u64)> = read(&mut r, 1024).await.expect("read");
        assert_eq!(a, Some(("hello".to_string(), 42)));
        assert_eq!(read::<_, u32>(&mut r, 1024).await.expect("read"), Some(7));
        assert_eq!(read::<_, u32>(&mut r, 1024).await.expect("eof"), None);
    }

    #[tokio::test]
    async fn oversized_truncated_and_versioned_frames_are_errors() {
        let big = encode(&vec![0u8; 5000]);
        assert!(matches!(read::<_, Vec<u8>>(&mut big.as_slice(), 1000).await, Err(Error::InvalidInput(_))));
        let cut = &big[..big.len() - 1];
        assert!(matches!(read::<_, Vec<u8>>(&mut &cut[..], 10_000).await, Err(Error::Protocol(_))));
        let mut wrong = encode(&1u8);
        wrong[4] = 99;
        assert!(matches!(read::<_, u8>(&mut wrong.as_slice(), 100).await, Err(Error::Protocol(_))));
        let header_only = [0u8, 0];
        assert!(read::<_, u8>(&mut &header_only[..], 100).await.is_err());
    }

    proptest! {
        // Arbitrary bytes never panic the decoder: they decode or they are an error.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_body::<crate::net::wire::Request>(&bytes);
        }
    }
}
