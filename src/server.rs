//! The client-facing QUIC server: an accept loop that refuses connections above the cap,
//! one task per connection, one task per request stream (bounded by the per-connection
//! stream limit in the transport config), and a span per connection and per request. A
//! stream of sends stays open for the client's next send (its lane, see `client`); a send's
//! answer is written by the state machine's task as it applies the send (see [`Reply`]).

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::Error;
use crate::net::frame;
use crate::net::lane::write_now;
use crate::net::wire::{ErrorCode, Request, Response};
use crate::service::{self, Service, SEND_TIMEOUT};

/// Serves clients on `endpoint` until `shutdown` completes or the endpoint closes. On
/// shutdown it stops accepting; connections already open end when the node closes the
/// endpoint.
pub async fn serve(node: Arc<Service>, endpoint: quinn::Endpoint, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(node.config.limits.connections_max));
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
            () = &mut shutdown => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "client handshake failed");
                    return;
                }
            };
            let span = tracing::info_span!("client", remote = %conn.remote_address());
            async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let node = node.clone();
                    tokio::spawn(handle(node, send, recv).instrument(tracing::debug_span!("request")));
                }
            }
            .instrument(span)
            .await
        });
    }
}

/// The client protocol's answer for an error met while serving a request. Every variant
/// is named: a new one must choose its answer here.
fn answer_of(e: Error) -> Response {
    let code = match &e {
        Error::NotLeader { shard, leader } => return Response::NotLeader { shard: *shard, leader: *leader },
        Error::Throttled { retry_after_ms } => return Response::Throttled { retry_after_ms: *retry_after_ms },
        Error::Truncated { earliest } => return Response::Truncated { earliest: *earliest },
        Error::InvalidInput(_) => ErrorCode::InvalidInput,
        Error::Rejected(_) => ErrorCode::Rejected,
        Error::Protocol(_) => ErrorCode::Protocol,
        Error::Ambiguous(_) => ErrorCode::Ambiguous,
        // The node cannot serve this now; another replica may.
        Error::Unavailable(_)
        | Error::Config(_)
        | Error::Tls { .. }
        | Error::Storage(_)
        | Error::Corrupt(_)
        | Error::Raft { .. }
        | Error::Task { .. }
        | Error::Refused(_)
        | Error::Io(_) => ErrorCode::Unavailable,
    };
    Response::Error { code, message: e.to_string() }
}

/// Serves one request stream. A stream whose requests are sends stays open for the next
/// send once it is answered (the client's lane); any other request is its stream's only one.
async fn handle(node: Arc<Service>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    loop {
        let request = match frame::read::<_, Request>(&mut recv, node.config.limits.frame_bytes_max).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                let _ = frame::write(&mut send, &answer_of(e)).await;
                break;
            }
        };
        let lane = request.keeps_stream();
        let response = match request {
            Request::Send(_) | Request::SendBatch(_) => {
                // The answer is written by the state machine's task (see `Reply`); `send`
                // comes back once it was, or with the answer still to write.
                match answer_send(&node, send, request).await {
                    Some(stream) => {
                        send = stream;
                        continue;
                    }
                    None => return,
                }
            }
            Request::SetCursor { user, conversation, offset } => node.set_cursor(user, conversation, offset).await,
            Request::GetCursor { user, conversation } => node.get_cursor(user, conversation).await,
            Request::Status => Response::Status(Box::new(node.status())),
            Request::Subscribe { conversation, from, follow } => {
                match node.subscribe(conversation, from, follow, &mut send).await {
                    Ok(()) => break,
                    Err(e) => answer_of(e),
                }
            }
        };
        if frame::write(&mut send, &response).await.is_err() {
            return;
        }
        if !lane {
            break;
        }
    }
    let _ = send.finish();
}

/// Answers one send request on its lane and gives the stream back, or `None` when the
/// stream failed.
///
/// A send's answer is known on the state machine's task, as the entry carrying it is
/// applied. Handing it to this task to write would make every answer its own datagram: the
/// write wakes the connection's driver, which runs at once, before the next woken handler
/// writes. So the answer is written where it is known — all answers of one apply batch are
/// written in the same task poll, and the driver sends them in as few datagrams as they fit.
async fn answer_send(node: &Service, stream: quinn::SendStream, request: Request) -> Option<quinn::SendStream> {
    let reply = Arc::new(Reply(Mutex::new(ReplyState::Waiting(stream))));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = reply.clone();
    let immediate = node
        .send_replying(request, move |answer| {
            writer.answer(&answer);
            let _ = done_tx.send(());
        })
        .await;
    let late = match immediate {
        Some(answer) => Some(answer),
        None => match tokio::time::timeout(SEND_TIMEOUT, done_rx).await {
            Ok(Ok(())) => None,
            // The group dropped the proposal without an outcome (it stopped).
            Ok(Err(_)) => Some(service::stopped_before_outcome().answer()),
            Err(_) => Some(service::no_commit_in_time().answer()),
        },
    };
    let (mut stream, rest) = match reply.take() {
        ReplyState::Answered(stream, rest) => (stream, rest),
        // No answer was written: the one known here is (an answer written meanwhile won).
        ReplyState::Waiting(stream) => {
            (stream, frame::encode(&late.unwrap_or_else(|| service::stopped_before_outcome().answer())))
        }
        ReplyState::Taken => return None,
    };
    if !rest.is_empty() && stream.write_all(&rest).await.is_err() {
        return None;
    }
    Some(stream)
}

/// The stream of one send request while its outcome is awaited.
struct Reply(Mutex<ReplyState>);

enum ReplyState {
    /// No answer written yet.
    Waiting(quinn::SendStream),
    /// The answer was written, but for the bytes the stream's flow-control window did not
    /// take (usually none): the handler writes those.
    Answered(quinn::SendStream, Vec<u8>),
    /// The handler took the stream back.
    Taken,
}

impl Reply {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReplyState> {
        // Every holder leaves a valid state before it could panic.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `answer` as far as the stream takes it without waiting, unless the handler
    /// already took the stream back (it answered `Ambiguous` after the timeout).
    fn answer(&self, answer: &Response) {
        let mut state = self.lock();
        if let ReplyState::Waiting(mut stream) = std::mem::replace(&mut *state, ReplyState::Taken) {
            let rest = write_now(&mut stream, frame::encode(answer));
            *state = ReplyState::Answered(stream, rest);
        }
    }

    fn take(&self) -> ReplyState {
        std::mem::replace(&mut *self.lock(), ReplyState::Taken)
    }
}
