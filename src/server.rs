//! The client-facing QUIC server: an accept loop, one task per connection, one task per
//! request stream (bounded by the per-connection stream limit in the transport config), and
//! a span per connection and per request. A stream of sends stays open for the client's
//! next send (its lane, see `client`); a send's answer is written by the state machine's
//! task as it applies the send (see [`Reply`]).
//!
//! Who the client is comes from its verified certificate, once per connection
//! ([`tls::credential_of`]): every request is served as that user, and `Status` only for an
//! admin. Connections are bounded where they cost: at most `limits.handshakes_in_flight_max`
//! handshakes at once and `limits.handshakes_per_s` started per second (beyond either, a client
//! whose address is not yet validated gets a QUIC Retry, and one that is, a refusal), and a
//! connection slot (`limits.connections_max`) is taken only once the handshake is done, so
//! half-open attempts cannot use the slots up. One user takes at most
//! `limits.connections_per_user_max` of them, so one credential cannot.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::Error;
use crate::net::frame;
use crate::net::lane::write_now;
use crate::net::tls::{self, Identity};
use crate::net::wire::{
    ErrorCode, Request, Response, CLOSE_FULL, CLOSE_NO_IDENTITY, CLOSE_REVOKED, CLOSE_REVOKED_OPEN, CLOSE_USER_FULL,
};
use crate::placement::PlacementCommand;
use crate::service::catch_up::ConnCatchUp;
use crate::service::{self, Service, SEND_TIMEOUT};

/// How long a new request stream may take to deliver its request.
pub const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The close reason a revoked credential's connections get.
pub const REVOKED_REASON: &str = "this credential was revoked (convoy user revoke)";
/// How often a node reads its revocation file (`<tls_dir>/revoked`) again.
pub const REVOKED_RELOAD: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes the keys of `list` (as the node read it at start), then reads it again every
/// [`REVOKED_RELOAD`] and publishes each change, until every receiver is gone. A list that
/// cannot be read keeps the last good one ([`tls::RevocationList`]). The client server and
/// the peer links watch the same list: users' keys and nodes' keys are revoked alike.
pub fn watch_revoked(mut list: tls::RevocationList) -> tokio::sync::watch::Receiver<tls::Revoked> {
    let (tx, rx) = tokio::sync::watch::channel(list.keys());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(REVOKED_RELOAD) => {}
            }
            if list.refresh() {
                tx.send_replace(list.keys());
            }
        }
    });
    rx
}

/// Serves clients on `endpoint` until `shutdown` completes or the endpoint closes. On
/// shutdown it stops accepting; connections already open end when the node closes the
/// endpoint.
pub async fn serve(
    node: Arc<Service>,
    endpoint: quinn::Endpoint,
    revoked: tokio::sync::watch::Receiver<tls::Revoked>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(node.config.limits.connections_max));
    let users = Arc::new(UserConnections::default());
    let limits = &node.config.limits;
    let handshakes = Arc::new(Semaphore::new(limits.handshakes_in_flight_max));
    let mut started = HandshakeRate::new(limits.handshakes_per_s);
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
            () = &mut shutdown => return,
        };
        let admitted = started.admit(std::time::Instant::now());
        let Some(handshake) = admitted.then(|| handshakes.clone().try_acquire_owned().ok()).flatten() else {
            // Under a handshake storm, make unvalidated addresses prove themselves first (a
            // Retry costs the node no state); refuse the rest until handshakes finish.
            if incoming.may_retry() && !incoming.remote_address_validated() {
                let _ = incoming.retry();
            } else {
                tracing::debug!(remote = %incoming.remote_address(), "handshake limit reached; refusing");
                incoming.refuse();
            }
            continue;
        };
        let (node, permits, users, mut revoked) = (node.clone(), permits.clone(), users.clone(), revoked.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "client handshake failed");
                    return;
                }
            };
            drop(handshake);
            let Ok(_permit) = permits.try_acquire_owned() else {
                tracing::warn!(remote = %conn.remote_address(), "connection limit reached; closing");
                node.metrics.refused_node_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                conn.close(CLOSE_FULL.into(), b"connection limit reached");
                return;
            };
            let _open = Open::count(node.metrics.clone());
            let (who, fingerprint) = match tls::credential_of(&conn) {
                Ok((who, fingerprint)) => (Arc::new(who), fingerprint),
                Err(e) => {
                    tracing::warn!(remote = %conn.remote_address(), error = %e, "refusing a client");
                    conn.close(CLOSE_NO_IDENTITY.into(), e.to_string().as_bytes());
                    return;
                }
            };
            // A revoked certificate is refused here, and a connection that presented one is
            // closed as soon as its revocation is read.
            if revoked.borrow_and_update().contains(&fingerprint) {
                tracing::info!(remote = %conn.remote_address(), user = %who.user, "refusing a revoked credential");
                conn.close(CLOSE_REVOKED.into(), REVOKED_REASON.as_bytes());
                return;
            }
            let max = node.config.limits.connections_per_user_max;
            let Some(user_slot) = users.take(&who.user, max, || node.catch_up.user_share()) else {
                tracing::warn!(remote = %conn.remote_address(), user = %who.user, max, "a user's connection limit reached; closing");
                node.metrics.refused_user_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = format!(
                    "user {} has {max} connections open on this node (limits.connections_per_user_max)",
                    who.user
                );
                conn.close(CLOSE_USER_FULL.into(), why.as_bytes());
                return;
            };
            let span = tracing::info_span!("client", remote = %conn.remote_address(), user = %who.user);
            let bucket = Arc::new(node.connection_bucket());
            let window = Arc::new(ConnCatchUp::of(conn.clone(), user_slot.share.clone()));
            async move {
                loop {
                    tokio::select! {
                        accepted = conn.accept_bi() => {
                            let Ok((send, recv)) = accepted else { break };
                            let caller = Caller { who: who.clone(), bucket: bucket.clone(), window: window.clone() };
                            tokio::spawn(
                                handle(node.clone(), caller, send, recv).instrument(tracing::debug_span!("request")),
                            );
                        }
                        () = tls::revoked_later(&mut revoked, &fingerprint) => {
                            tracing::info!("closing the connection of a credential just revoked");
                            conn.close(CLOSE_REVOKED_OPEN.into(), REVOKED_REASON.as_bytes());
                            break;
                        }
                    }
                }
            }
            .instrument(span)
            .await
        });
    }
}

/// An open client connection, counted in `convoy_connections` while it lives.
struct Open(Arc<service::metrics::Metrics>);

impl Open {
    fn count(metrics: Arc<service::metrics::Metrics>) -> Open {
        metrics.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Open(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Open client connections per user on this node, and the user's share of the catch-up
/// budget, which its connections use together (only users with one open are listed).
#[derive(Default)]
struct UserConnections(Mutex<std::collections::HashMap<String, (usize, Arc<Semaphore>)>>);

/// One of a user's connections, counted in [`UserConnections`] while it lives.
struct UserSlot {
    users: Arc<UserConnections>,
    user: String,
    /// The user's share of the catch-up budget.
    share: Arc<Semaphore>,
}

impl UserConnections {
    /// A slot for one more connection of `user`, unless it has `max` open; a user's first
    /// gets its share from `new_share`.
    fn take(self: &Arc<Self>, user: &str, max: usize, new_share: impl FnOnce() -> Arc<Semaphore>) -> Option<UserSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (n, share) = open.entry(user.to_string()).or_insert_with(|| (0, new_share()));
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot { users: self.clone(), user: user.to_string(), share: share.clone() })
    }

    #[cfg(test)]
    fn open(&self, user: &str) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(user).map_or(0, |(n, _)| *n)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut open = self.users.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// A token bucket of handshakes started per second (the accept loop is its only user).
struct HandshakeRate {
    per_s: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl HandshakeRate {
    fn new(per_s: u32) -> HandshakeRate {
        let per_s = f64::from(per_s);
        HandshakeRate { per_s, tokens: per_s, at: std::time::Instant::now() }
    }

    /// Whether one more handshake may start now (and takes its token).
    fn admit(&mut self, now: std::time::Instant) -> bool {
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * self.per_s).min(self.per_s);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The client protocol's answer for an error met while serving a request. Every variant
/// is named: a new one must choose its answer here.
fn answer_of(e: Error) -> Response {
    let code = match &e {
        Error::NotLeader { shard, leader } => return Response::NotLeader { shard: *shard, leader: *leader, map: None },
        Error::Throttled { retry_after_ms } => return Response::Throttled { retry_after_ms: *retry_after_ms },
        Error::Truncated { earliest } => return Response::Truncated { earliest: *earliest },
        Error::InvalidInput(_) => ErrorCode::InvalidInput,
        Error::Rejected(_) => ErrorCode::Rejected,
        Error::Forbidden(_) => ErrorCode::Forbidden,
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
    // The client names the class again (`forbidden: …`): the message is what follows it.
    let message = match e {
        Error::InvalidInput(m)
        | Error::Rejected(m)
        | Error::Forbidden(m)
        | Error::Protocol(m)
        | Error::Ambiguous(m)
        | Error::Unavailable(m) => m,
        other => other.to_string(),
    };
    Response::Error { code, message }
}

/// Serves one request stream. A stream whose requests are sends stays open for the next
/// send once it is answered (the client's lane); any other request is its stream's only one.
/// Who sent a request, and their connection's send bucket.
struct Caller {
    who: Arc<Identity>,
    bucket: Arc<std::sync::Mutex<service::rates::Bucket>>,
    /// The connection's part in the catch-up budget (see `service::catch_up`).
    window: Arc<ConnCatchUp>,
}

async fn handle(node: Arc<Service>, caller: Caller, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let who = &*caller.who;
    let mut first = true;
    loop {
        let max = node.config.limits.frame_bytes_max;
        // A stream's first request must come within REQUEST_READ_TIMEOUT of its opening; a
        // lane then waits for its next send as long as the connection lives.
        let read = if std::mem::take(&mut first) {
            match tokio::time::timeout(REQUEST_READ_TIMEOUT, frame::read::<_, Request>(&mut recv, max)).await {
                Ok(read) => read,
                Err(_) => Err(Error::InvalidInput(format!("no request within {REQUEST_READ_TIMEOUT:?}"))),
            }
        } else {
            frame::read::<_, Request>(&mut recv, max).await
        };
        let request = match read {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                let _ = frame::write(&mut send, &answer_of(e)).await;
                break;
            }
        };
        let lane = request.keeps_stream();
        // Changes other than sends (cursor moves, membership and retention changes) are log
        // entries too, limited by the same rates, and refused here from non-members; sends
        // take theirs on their own path.
        let response = match node.admit_change(who, &caller.bucket, &request).await {
            Err(answer) => answer,
            Ok(()) => match request {
                Request::Send(_) | Request::SendBatch(_) => {
                    // The answer is written by the state machine's task (see `Reply`); `send`
                    // comes back once it was, or with the answer still to write.
                    match answer_send(&node, &caller, send, request).await {
                        Some(stream) => {
                            send = stream;
                            continue;
                        }
                        None => return,
                    }
                }
                Request::SetCursor { user, conversation, offset } => {
                    node.set_cursor(who, user, conversation, offset).await
                }
                Request::GetCursor { user, conversation } => node.get_cursor(who, user, conversation).await,
                Request::GetCursorFromLeader { user, conversation } => {
                    node.get_cursor_from_leader(who, user, conversation).await
                }
                Request::Members { conversation, change } => node.members(who, conversation, change).await,
                Request::SetRetention { conversation, retention } => {
                    node.set_retention(who, conversation, retention).await
                }
                Request::TransferLeader { shard, to } => {
                    node.admin_place(who, PlacementCommand::SetPreferredLeader { shard, node: to }).await
                }
                Request::Move { shard, from, to } => {
                    node.admin_place(who, PlacementCommand::StartMove { shard, from, to }).await
                }
                Request::CancelOperation { id } => node.admin_place(who, PlacementCommand::CancelMove { id }).await,
                Request::Drain { node: n } => node.admin_place(who, PlacementCommand::Drain { node: n }).await,
                Request::RemoveNode { node: n } => {
                    node.admin_place(who, PlacementCommand::RemoveNode { node: n }).await
                }
                Request::ReplaceNode { node: n } => node.admin_place(who, PlacementCommand::MarkLost { node: n }).await,
                Request::Recommission { node: n } => {
                    node.admin_place(who, PlacementCommand::Recommission { node: n }).await
                }
                Request::Status if who.admin => Response::Status(Box::new(node.status())),
                Request::Status => answer_of(Error::Forbidden(format!("user {:?} is not an admin", who.user))),
                Request::ShardMap => Response::ShardMap(Box::new(node.cluster_map().routing())),
                Request::Subscribe { conversation, from, follow } => {
                    match node.subscribe(who, conversation, from, follow, &mut send, &caller.window).await {
                        Ok(()) => break,
                        Err(e) => answer_of(e),
                    }
                }
            },
        };
        // Bounded like a subscriber's writes: a client that reads nothing (a stalled
        // subscriber's stream above all, whose error answer follows its dropped writes)
        // must not pin the stream and its buffers for as long as the connection lives.
        match tokio::time::timeout(service::SUBSCRIBER_WRITE_TIMEOUT, frame::write(&mut send, &node.routed(response)))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let _ = send.reset(0u32.into());
                return;
            }
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
async fn answer_send(
    node: &Arc<Service>,
    caller: &Caller,
    stream: quinn::SendStream,
    request: Request,
) -> Option<quinn::SendStream> {
    let reply = Arc::new(Reply(Mutex::new(ReplyState::Waiting(stream))));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = reply.clone();
    let router = node.clone();
    let immediate = node
        .send_replying(&caller.who, &caller.bucket, request, move |answer| {
            writer.answer(&router.routed(answer));
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
            (stream, frame::encode(&node.routed(late.unwrap_or_else(|| service::stopped_before_outcome().answer()))))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn handshakes_beyond_the_rate_wait_for_tokens() {
        let t0 = Instant::now();
        let mut rate = HandshakeRate { per_s: 100.0, tokens: 100.0, at: t0 };
        assert_eq!((0..150).filter(|_| rate.admit(t0)).count(), 100, "the burst is one second's worth");
        assert!(!rate.admit(t0 + Duration::from_millis(5)));
        assert!(rate.admit(t0 + Duration::from_millis(20)), "a token every 10 ms");
        assert_eq!(
            (0..500).filter(|_| rate.admit(t0 + Duration::from_secs(60))).count(),
            100,
            "refills to the burst only"
        );
    }

    #[test]
    fn a_user_takes_at_most_its_slots_and_gets_them_back() {
        let users = Arc::new(UserConnections::default());
        let share = || Arc::new(Semaphore::new(1));
        let mut alice: Vec<UserSlot> = (0..3).map(|_| users.take("alice", 3, share).expect("a slot")).collect();
        assert!(users.take("alice", 3, share).is_none(), "a fourth connection of alice is refused");
        let bob = users.take("bob", 3, share).expect("other users are not affected");
        assert_eq!((users.open("alice"), users.open("bob")), (3, 1));
        assert!(Arc::ptr_eq(&alice[0].share, &alice[2].share), "a user's connections share one catch-up share");
        assert!(!Arc::ptr_eq(&alice[0].share, &bob.share), "each user has its own");
        alice.pop();
        alice.push(users.take("alice", 3, share).expect("a closed connection gives its slot back"));
        assert!(users.take("alice", 3, share).is_none(), "and takes it again");
        drop(bob);
        assert_eq!((users.open("alice"), users.open("bob")), (3, 0));
        assert_eq!(users.0.lock().unwrap().len(), 1, "a user with none open is not kept");
    }
}
