//! The node's metrics endpoint: Prometheus/OpenMetrics text at `GET /metrics` on the node's
//! `metrics_addr`, over plain HTTP/1.1 (see `service::metrics` for what is measured).
//!
//! The server is deliberately small and bounded: a request's head must arrive within
//! [`REQUEST_TIMEOUT`] and fit [`REQUEST_BYTES_MAX`], its answer must be taken within
//! [`ANSWER_TIMEOUT`], at most [`CONNECTIONS_MAX`] scrapes run at once (more are closed
//! unanswered), and every answer closes its connection. Anything but
//! `GET /metrics` gets a 404 or 400 and nothing else.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::service::metrics::NodeCollector;
use crate::service::Service;

/// How long a scrape may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape may take to read its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head read.
pub const REQUEST_BYTES_MAX: usize = 8 << 10;
/// Scrapes served at once.
pub const CONNECTIONS_MAX: usize = 16;
/// The exposition's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The node's metrics as exposition text.
pub fn render(node: &Arc<Service>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector::new(node)));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    text
}

/// Binds the metrics endpoint's address, so a node fails at start, before it joins its
/// groups, when the address is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Config(format!("cannot serve metrics on {addr}: {e}")))
}

/// Serves the metrics of `node` on `listener` until `shutdown` completes.
pub fn serve(
    node: Arc<Service>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = answer(&node, stream).await {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            });
        }
    })
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    Bad,
}

/// Reads the request line of a head (`GET /metrics HTTP/1.1`, query ignored).
fn asked(head: &[u8]) -> Asked {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else { return Asked::Bad };
    let mut parts = line.trim_end_matches('\r').split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(v)) if v.starts_with("HTTP/1.") => {
            if path.split('?').next() == Some("/metrics") {
                Asked::Metrics
            } else {
                Asked::NotFound
            }
        }
        _ => Asked::Bad,
    }
}

async fn answer(node: &Arc<Service>, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_BYTES_MAX {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let (status, content_type, body) = match read {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => match asked(&head) {
            // Rendering reads RocksDB's properties and lists the data directory: off the
            // runtime's workers, which carry every group's Raft rounds.
            Asked::Metrics => {
                let node = node.clone();
                match tokio::task::spawn_blocking(move || render(&node)).await {
                    Ok(text) => ("200 OK", CONTENT_TYPE, text),
                    Err(e) => {
                        tracing::warn!(error = %e, "rendering the metrics failed");
                        ("500 Internal Server Error", "text/plain", "rendering the metrics failed\n".to_string())
                    }
                }
            }
            Asked::NotFound => ("404 Not Found", "text/plain", "only /metrics is served here\n".to_string()),
            Asked::Bad => ("400 Bad Request", "text/plain", "expected GET /metrics\n".to_string()),
        },
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A scraper that stops reading must not hold one of the endpoint's slots for as long as
    // its connection lives: the answer is written, and the stream shut, within the same bound.
    match tokio::time::timeout(ANSWER_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(done) => done,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the scraper read nothing in time")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(asked(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Asked::Metrics);
        assert_eq!(asked(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Asked::Metrics);
        assert_eq!(asked(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(asked(b"POST /metrics HTTP/1.1\r\n\r\n"), Asked::Bad);
        assert_eq!(asked(b"\xff\xfe garbage"), Asked::Bad);
        assert_eq!(asked(b""), Asked::Bad);
    }
}
