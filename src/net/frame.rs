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

/// Version byte of every frame. Raised whenever a message of the client or peer protocol
/// changes shape, so a peer of another build is refused with a clear error instead of
/// misreading: 2 since the metadata group (`Request::TransferLeader`, the cluster map in
/// `NodeStatus`, `PeerRequest::Place`); 3 since routing maps (`Request::ShardMap`, the map
/// in `Response::NotLeader`); 4 since `PeerRequest::SnapshotEnd` (a snapshot stream without
/// it is refused); 5 since per-peer frames of AppendEntries (`PeerRequest::Appends`, and
/// `append_frames` in `NodeStatus`); 6 since `Request::GetCursorFromLeader`; 7 since a
/// rejoin's final refusal (`PeerResponse::NotRejoined`); 8 since it names the newest replica
/// id.
pub const WIRE_VERSION: u8 = 8;

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

/// How the `Protocol` error of a frame in another wire version begins: the peer runs
/// another build, which retrying does not change.
pub const VERSION_MISMATCH: &str = "unsupported wire version";

/// Whether `e` says a frame came in another wire version (see [`VERSION_MISMATCH`]).
pub fn is_version_mismatch(e: &Error) -> bool {
    matches!(e, Error::Protocol(m) if m.starts_with(VERSION_MISMATCH))
}

/// Decodes a frame's version byte and body (everything after the length).
pub fn decode_body<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    match payload.first() {
        Some(&WIRE_VERSION) => {}
        Some(v) => return Err(Error::Protocol(format!("{VERSION_MISMATCH} {v} (this build speaks {WIRE_VERSION})"))),
        None => return Err(Error::Protocol("empty frame".into())),
    }
    // A list longer than its bound is a request the peer may send, just not accept: invalid
    // input, as a check after decoding would have said. Anything else is a malformed frame.
    let (value, used) = crate::decode::from_slice(&payload[1..]).map_err(|e| match crate::decode::over_bound(&e) {
        Some(m) => Error::InvalidInput(m.to_string()),
        None => Error::Protocol(format!("malformed frame: {e}")),
    })?;
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

/// Writes `bytes` (whole frames) to a QUIC stream, giving up when it takes no byte for
/// `within` (a slow reader on a narrow window makes progress; one that stopped reading does
/// not): `Err(Some(e))` if the write failed, `Err(None)` if it gave up. Either way the stream
/// is reset, as the write may have left part of a frame on it: nothing written after it (an
/// error answer) may complete that frame. A message cut inside its text and completed by
/// other bytes decodes whole, with another text, and its reader would take it as delivered.
pub async fn write_or_reset(
    out: &mut quinn::SendStream,
    bytes: &[u8],
    within: std::time::Duration,
) -> std::result::Result<(), Option<quinn::WriteError>> {
    let mut rest = bytes;
    let failed = loop {
        if rest.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(within, out.write(rest)).await {
            // quinn takes at least one byte of a non-empty buffer, or waits.
            Ok(Ok(n)) if n > 0 => rest = &rest[n..],
            Ok(Ok(_)) | Err(_) => break None,
            Ok(Err(e)) => break Some(e),
        }
    };
    let _ = out.reset(0u32.into());
    Err(failed)
}

/// A frame header's length, refused before anything is allocated for it when it is zero or
/// over `max_bytes`.
fn checked_len(header: [u8; 4], max_bytes: usize) -> Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(Error::Protocol("empty frame".into()));
    }
    if len > max_bytes {
        return Err(Error::InvalidInput(format!("frame of {len} bytes exceeds the limit of {max_bytes}")));
    }
    Ok(len)
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
    let len = checked_len(len, max_bytes)?;
    // The buffer grows with what arrives, not with what the header announces: a 4-byte
    // header alone costs the reader nothing. The body must then arrive within
    // `FRAME_BODY_TIMEOUT`.
    let mut payload = Vec::with_capacity(len.min(FRAME_BUFFER_START));
    let body = async {
        while payload.len() < len {
            let start = payload.len();
            let grow = (len - start).min(start.max(FRAME_BUFFER_START));
            payload.resize(start + grow, 0);
            let n = r.read(&mut payload[start..]).await.map_err(|e| Error::Unavailable(format!("read: {e}")))?;
            payload.truncate(start + n);
            if n == 0 {
                return Err(Error::Protocol(format!("stream ended inside a frame ({start} of {len} bytes)")));
            }
        }
        Ok(())
    };
    tokio::time::timeout(FRAME_BODY_TIMEOUT, body).await.map_err(|_| {
        Error::Protocol(format!("a frame of {len} bytes did not arrive within {FRAME_BODY_TIMEOUT:?}"))
    })??;
    decode_body(&payload).map(Some)
}

/// What a frame reader allocates before any of the body has arrived; the buffer then at most
/// doubles per read.
const FRAME_BUFFER_START: usize = 16 << 10;
/// How long a frame's body may take to arrive once its header has.
pub const FRAME_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads frames from a byte stream through one reusable buffer: frames already buffered
/// decode without touching the stream (no await, no allocation per frame), and the stream
/// is read in large chunks only when less than a whole frame is buffered. A catch-up is
/// hundreds of thousands of small frames; read one by one, each would cost two stream
/// reads (each taking the QUIC connection's lock) and a fresh payload buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_bytes: usize,
    /// Since when part of the next frame is buffered: the rest must arrive within
    /// [`FRAME_BODY_TIMEOUT`]. Between frames a stream may be quiet for as long as it likes.
    partial_since: Option<tokio::time::Instant>,
    body_timeout: std::time::Duration,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames of at most `max_bytes` whose buffer starts at `capacity` bytes
    /// and grows only as far as one frame needs.
    pub fn new(inner: R, max_bytes: usize, capacity: usize) -> Self {
        FrameReader {
            inner,
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
            max_bytes,
            partial_since: None,
            body_timeout: FRAME_BODY_TIMEOUT,
        }
    }

    /// The length of the frame at the front of the buffer, checked against the limit.
    fn front_len(&self) -> Result<Option<usize>> {
        if self.end - self.start < 4 {
            return Ok(None);
        }
        let header = self.buf[self.start..self.start + 4].try_into().expect("four bytes");
        checked_len(header, self.max_bytes).map(Some)
    }

    /// Whether [`FrameReader::next`] returns without reading: a whole frame, or a bad
    /// header, is buffered.
    pub fn has_frame(&self) -> bool {
        match self.front_len() {
            Ok(Some(len)) => self.end - self.start >= 4 + len,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream, an error on an end inside a
    /// frame, an oversized or malformed frame, or a frame begun that is not whole within
    /// [`FRAME_BODY_TIMEOUT`]. The buffer grows with what arrives (at most doubling per
    /// read), not with what a header announces.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            let want = match self.front_len()? {
                Some(len) if self.end - self.start >= 4 + len => {
                    let body = &self.buf[self.start + 4..self.start + 4 + len];
                    let value = decode_body(body)?;
                    self.start += 4 + len;
                    self.partial_since = None;
                    return Ok(Some(value));
                }
                Some(len) => 4 + len,
                None => 4,
            };
            // Make room: move the partial frame to the front, grow for a large frame.
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.start > 0 && self.buf.len() - self.start < want.max(self.buf.len() / 2) {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            if self.buf.len() - self.start < want {
                let grown = (self.buf.len() * 2).max(self.end + FRAME_BUFFER_START);
                self.buf.resize((self.start + want).min(grown), 0);
            }
            let read = self.inner.read(&mut self.buf[self.end..]);
            let n = if self.end > self.start {
                let since = *self.partial_since.get_or_insert_with(tokio::time::Instant::now);
                let within = self.body_timeout;
                tokio::time::timeout_at(since + within, read)
                    .await
                    .map_err(|_| Error::Protocol(format!("a frame begun did not arrive whole within {within:?}")))?
            } else {
                read.await
            }
            .map_err(|e| Error::Unavailable(format!("read: {e}")))?;
            if n == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(Error::Protocol("stream ended inside a frame".into()))
                };
            }
            self.end += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The 15-byte frame that used to abort a node: a `Request::Send` whose conversation
    // announces 2^50 bytes. It is an error now, and so is every other lying length.
    #[tokio::test]
    async fn a_crafted_length_inside_a_frame_is_an_error_not_an_abort() {
        use crate::net::wire::Request;
        for announced in [1u64 << 32, 1 << 50, 1 << 63] {
            let mut body = vec![WIRE_VERSION, 0 /* Request::Send */, 253];
            body.extend_from_slice(&announced.to_le_bytes());
            let mut framed = ((body.len()) as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&body);
            let err = read::<_, Request>(&mut framed.as_slice(), 1 << 20).await.expect_err("a lying length");
            assert!(matches!(err, Error::Protocol(_)), "{err}");
        }
    }

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

    /// A reader that hands out at most `step` bytes per read, to split frames anywhere.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl tokio::io::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A node that announces a large frame and stops writing (its connection alive) costs
    /// the reader no more than it sent, and the reader an error once the body is late; a
    /// stream quiet between frames is waited for.
    #[tokio::test]
    async fn a_frame_begun_and_never_finished_is_an_error_and_allocates_what_arrived() {
        use tokio::io::AsyncWriteExt;
        let (mut node, client) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(client, 4 << 20, 64);
        r.body_timeout = std::time::Duration::from_millis(300);
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(600), r.next::<Vec<u8>>()).await;
        assert!(quiet.is_err(), "no frame begun: the reader waits");
        node.write_all(&encode(&vec![7u8; 100])).await.expect("write");
        node.write_all(&(4u32 << 20).to_be_bytes()).await.expect("write a header");
        node.write_all(&[1, 2, 3]).await.expect("and three bytes of its body");
        assert_eq!(r.next::<Vec<u8>>().await.expect("the whole frame"), Some(vec![7u8; 100]));
        let late = tokio::time::timeout(std::time::Duration::from_secs(5), r.next::<Vec<u8>>()).await;
        let e = late.expect("an error once the body is late, not a wait").expect_err("the body never comes");
        assert!(matches!(&e, Error::Protocol(m) if m.contains("did not arrive")), "{e}");
        assert!(r.buf.len() <= 64 << 10, "{} bytes buffered for 7 received", r.buf.len());
        drop(node);
    }

    #[tokio::test]
    async fn frame_reader_errors_like_read() {
        let big = encode(&vec![0u8; 5000]);
        let mut r = FrameReader::new(big.as_slice(), 1000, 64);
        assert!(matches!(r.next::<Vec<u8>>().await, Err(Error::InvalidInput(_))), "oversized");
        let mut r = FrameReader::new(&big[..big.len() - 1], 10_000, 64);
        assert!(matches!(r.next::<Vec<u8>>().await, Err(Error::Protocol(_))), "truncated");
        let mut r = FrameReader::new(&[0u8, 0, 0, 0][..], 100, 64);
        assert!(matches!(r.next::<u8>().await, Err(Error::Protocol(_))), "empty frame");
        let mut r = FrameReader::new(&[0u8, 0][..], 100, 64);
        assert!(r.next::<u8>().await.is_err(), "end inside a header");
    }

    proptest! {
        // Any sequence of frames, delivered in pieces of any size into a buffer of any
        // starting size, reads back exactly, then ends cleanly.
        #[test]
        fn frame_reader_reads_what_read_reads(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            step in 1usize..700,
            capacity in 1usize..512,
        ) {
            let bytes: Vec<u8> = values.iter().flat_map(encode).collect();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
            let got = rt.block_on(async {
                let mut r = FrameReader::new(Trickle { data: &bytes, step }, 1024, capacity);
                let mut got = Vec::new();
                while let Some(v) = r.next::<Vec<u8>>().await.expect("well-formed frames") {
                    got.push(v);
                }
                got
            });
            prop_assert_eq!(got, values);
        }

        // Arbitrary bytes never panic the decoder: they decode or they are an error.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_body::<crate::net::wire::Request>(&bytes);
        }
    }
}
