//! The client-facing QUIC server: an accept loop that refuses connections above the cap,
//! one task per connection, one task per request stream (bounded by the per-connection
//! stream limit in the transport config), and a span per connection and per request. A
//! stream of sends stays open for the client's next send (its lane, see `client`).

use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::Instrument;

use super::frame;
use super::wire::{ErrorCode, Request, Response};
use crate::error::Error;
use crate::service::Node;

/// Serves clients until the endpoint closes.
pub async fn serve(node: Arc<Node>) {
    let permits = Arc::new(Semaphore::new(node.config.limits.max_connections));
    while let Some(incoming) = node.client_endpoint.accept().await {
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

fn code_of(e: &Error) -> ErrorCode {
    match e {
        Error::InvalidInput(_) => ErrorCode::InvalidInput,
        Error::Protocol(_) => ErrorCode::Protocol,
        Error::Ambiguous(_) => ErrorCode::Ambiguous,
        _ => ErrorCode::Unavailable,
    }
}

/// Serves one request stream. A stream whose requests are sends stays open for the next
/// send once it is answered (the client's lane); any other request is its stream's only one.
async fn handle(node: Arc<Node>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    loop {
        let request = match frame::read::<_, Request>(&mut recv, node.config.limits.max_frame_bytes).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                let _ = frame::write(&mut send, &Response::Error { code: code_of(&e), message: e.to_string() }).await;
                break;
            }
        };
        let lane = request.keeps_stream();
        let response = match request {
            Request::Send(req) => node.send(req).await,
            Request::SendBatch(reqs) => node.send_batch(reqs).await,
            Request::SetCursor { user, conversation, offset } => node.set_cursor(user, conversation, offset).await,
            Request::GetCursor { user, conversation } => node.get_cursor(user, conversation).await,
            Request::Status => Response::Status(Box::new(node.status())),
            Request::Subscribe { conversation, from, follow } => {
                match node.subscribe(conversation, from, follow, &mut send).await {
                    Ok(()) => break,
                    Err(e) => Response::Error { code: code_of(&e), message: e.to_string() },
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
