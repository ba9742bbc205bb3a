//! Input sources: a JSON-lines file, stdin, or a ZeroMQ SUB socket. Each feeds a bounded queue
//! (back-pressure: a slow store slows reading) and closes it at end of input.

use std::path::PathBuf;

use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

use crate::settle::Message;

/// Messages queued between a source and the pipeline.
pub const SOURCE_QUEUE_DEPTH: usize = 8192;
/// Longest line read (longer ones are passed on truncated and rejected by validation).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Where input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A JSON-lines file.
    File(PathBuf),
    /// Standard input.
    Stdin,
    /// A ZeroMQ publisher to subscribe to: `tcp://HOST:PORT`.
    Zmq(String),
}

impl std::str::FromStr for Input {
    type Err = String;
    fn from_str(s: &str) -> Result<Input, String> {
        if s == "-" {
            Ok(Input::Stdin)
        } else if let Some(rest) = s.strip_prefix("zmq+") {
            if !rest.starts_with("tcp://") {
                return Err(format!("{s:?}: ZeroMQ input must be zmq+tcp://HOST:PORT"));
            }
            Ok(Input::Zmq(rest.to_string()))
        } else if s.is_empty() {
            Err("empty input".into())
        } else {
            Ok(Input::File(PathBuf::from(s)))
        }
    }
}

/// Progress of a file source, for a progress bar.
pub type Progress = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Starts reading `input` into a bounded queue. Returns the receiver; the reader stops at end of
/// input or when `shutdown` turns true. `progress` counts bytes read (files and stdin).
pub async fn start(
    input: &Input,
    shutdown: watch::Receiver<bool>,
    progress: Progress,
) -> Result<mpsc::Receiver<Message>, String> {
    let (tx, rx) = mpsc::channel(SOURCE_QUEUE_DEPTH);
    match input {
        Input::File(path) => {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| format!("cannot open input {}: {e}", path.display()))?;
            tokio::spawn(read_lines(
                tokio::io::BufReader::new(file),
                tx,
                shutdown,
                progress,
            ));
        }
        Input::Stdin => {
            tokio::spawn(read_lines(
                tokio::io::BufReader::new(tokio::io::stdin()),
                tx,
                shutdown,
                progress,
            ));
        }
        Input::Zmq(endpoint) => {
            let socket = zmq_subscribe(endpoint).await?;
            tokio::spawn(read_zmq(socket, tx, shutdown));
        }
    }
    Ok(rx)
}

async fn read_lines<R: tokio::io::AsyncRead + Unpin>(
    mut reader: tokio::io::BufReader<R>,
    tx: mpsc::Sender<Message>,
    mut shutdown: watch::Receiver<bool>,
    progress: Progress,
) {
    let mut buf = Vec::with_capacity(512);
    loop {
        buf.clear();
        let read = tokio::select! {
            r = reader.read_until(b'\n', &mut buf) => r,
            _ = shutdown.changed() => return,
        };
        match read {
            Ok(0) => return,
            Ok(n) => {
                progress.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let line = buf.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let bytes = line[..line.len().min(MAX_LINE_BYTES)].to_vec();
                if tx.send(Message { bytes }).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reading input failed; stopping intake");
                return;
            }
        }
    }
}

async fn zmq_subscribe(endpoint: &str) -> Result<zeromq::SubSocket, String> {
    use zeromq::Socket;
    let mut socket = zeromq::SubSocket::new();
    socket
        .connect(endpoint)
        .await
        .map_err(|e| format!("cannot connect ZeroMQ SUB to {endpoint}: {e}"))?;
    socket
        .subscribe("")
        .await
        .map_err(|e| format!("cannot subscribe on {endpoint}: {e}"))?;
    tracing::info!(endpoint, "subscribed to ZeroMQ publisher");
    Ok(socket)
}

async fn read_zmq(
    mut socket: zeromq::SubSocket,
    tx: mpsc::Sender<Message>,
    mut shutdown: watch::Receiver<bool>,
) {
    use zeromq::SocketRecv;
    loop {
        let msg = tokio::select! {
            m = socket.recv() => m,
            _ = shutdown.changed() => return,
        };
        match msg {
            Ok(msg) => {
                // One JSON object per message; multi-frame messages are joined.
                let mut bytes = Vec::new();
                for frame in msg.iter() {
                    bytes.extend_from_slice(frame);
                }
                if tx.send(Message { bytes }).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "ZeroMQ receive failed; stopping intake");
                return;
            }
        }
    }
}
