//! Logs (tracing), the Prometheus `/metrics` and `/health` endpoint, and the progress bar.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber (stderr; `RUST_LOG` overrides the `info` default).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Health served on `/health`: 200 while up, 503 once it is cleared (failed or draining); the
/// body also reports the open holes (sequences never seen, P9).
#[derive(Clone, Debug, Default)]
pub struct Health {
    up: Arc<AtomicBool>,
    open_holes: Arc<AtomicU64>,
}

impl Health {
    /// Healthy from the start.
    pub fn new() -> Health {
        Health {
            up: Arc::new(AtomicBool::new(true)),
            open_holes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Marks the process unhealthy.
    pub fn set_unhealthy(&self) {
        self.up.store(false, Ordering::Relaxed);
    }

    /// Records the number of open holes.
    pub fn set_open_holes(&self, holes: u64) {
        self.open_holes.store(holes, Ordering::Relaxed);
    }

    /// The counter the pipeline keeps current.
    pub fn open_holes_counter(&self) -> Arc<AtomicU64> {
        self.open_holes.clone()
    }

    fn is_healthy(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn body(&self) -> String {
        let holes = self.open_holes.load(Ordering::Relaxed);
        let state = if self.is_healthy() { "ok" } else { "unhealthy" };
        format!("{state}\nopen_holes {holes}\n")
    }
}

/// Most request bytes read from a metrics client.
const MAX_REQUEST_BYTES: usize = 8192;

/// Installs the Prometheus recorder and serves `GET /metrics` and `GET /health` on `addr`.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve_metrics(addr: SocketAddr, health: Health) -> std::io::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 5.0,
        ])
        .expect("static buckets are valid")
        .install_recorder()
        .map_err(|e| std::io::Error::other(format!("installing the metrics recorder: {e}")))?;
    describe_metrics();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /metrics and /health");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &handle, &health).await;
            });
        }
    });
    Ok(bound)
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    // Read until the end of the request head (or the limit).
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        len += n;
        if n == 0 || buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        "/health" if health.is_healthy() => ("200 OK", "text/plain", health.body()),
        "/health" => ("503 Service Unavailable", "text/plain", health.body()),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("settlement_events_total", "Messages received");
    describe_counter!(
        "settlement_settled_total",
        "Events settled (durable and acknowledged)"
    );
    describe_counter!("settlement_rejected_total", "Messages rejected");
    describe_counter!(
        "settlement_duplicates_total",
        "Messages skipped as duplicates"
    );
    describe_counter!(
        "settlement_gaps_total",
        "Gaps in the output sequence (each opened a hole)"
    );
    describe_counter!(
        "settlement_hole_fills_total",
        "Messages that filled (part of) an open hole"
    );
    describe_gauge!(
        "settlement_open_holes",
        "Open holes: runs of output sequences never seen"
    );
    describe_gauge!("settlement_writer_epoch", "This writer's epoch (fencing)");
    describe_counter!(
        "settlement_recovered_entries_total",
        "Pending entries handled by recovery, by class"
    );
    describe_histogram!(
        "settlement_wal_sync_seconds",
        Unit::Seconds,
        "WAL append + sync per micro-batch"
    );
    describe_histogram!(
        "settlement_batch_seconds",
        Unit::Seconds,
        "Ingest to commit marker per micro-batch"
    );
    describe_gauge!(
        "settlement_wal_pending_entries",
        "WAL entries without a commit marker"
    );
}
