//! Input sources: a JSON-lines file, stdin, or a ZeroMQ SUB socket. Each feeds a bounded queue
//! (back-pressure: a slow store slows reading) and closes it at end of input.

use std::path::PathBuf;

use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

use crate::settle::{Message, SOURCE_CHUNK_MESSAGES};

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

/// The bounded queue a source feeds the pipeline through: chunks of 1 to
/// [`SOURCE_CHUNK_MESSAGES`] messages, at most [`SOURCE_QUEUE_DEPTH`] messages' worth of chunks.
pub fn source_channel() -> (mpsc::Sender<Vec<Message>>, mpsc::Receiver<Vec<Message>>) {
    mpsc::channel(SOURCE_QUEUE_DEPTH.div_ceil(SOURCE_CHUNK_MESSAGES))
}

/// Progress of a file source, for a progress bar.
pub type Progress = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Starts reading `input` into a bounded queue. Returns the receiver; the reader stops at end of
/// input or when `shutdown` turns true. `progress` counts bytes read (files and stdin).
pub async fn start(
    input: &Input,
    shutdown: watch::Receiver<bool>,
    progress: Progress,
) -> Result<mpsc::Receiver<Vec<Message>>, String> {
    let (tx, rx) = source_channel();
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

/// Reads lines into chunks: a chunk goes out when it is full or when the reader holds no other
/// complete line (so a line that arrived alone on stdin is not held back waiting for more).
async fn read_lines<R: tokio::io::AsyncRead + Unpin>(
    mut reader: tokio::io::BufReader<R>,
    tx: mpsc::Sender<Vec<Message>>,
    mut shutdown: watch::Receiver<bool>,
    progress: Progress,
) {
    let mut buf = Vec::with_capacity(512);
    let mut chunk: Vec<Message> = Vec::with_capacity(SOURCE_CHUNK_MESSAGES);
    loop {
        buf.clear();
        let read = tokio::select! {
            r = reader.read_until(b'\n', &mut buf) => r,
            _ = shutdown.changed() => return,
        };
        let stop = match read {
            Ok(0) => true,
            Ok(n) => {
                progress.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let line = buf.trim_ascii();
                if !line.is_empty() {
                    let bytes = line[..line.len().min(MAX_LINE_BYTES)].to_vec();
                    chunk.push(Message { bytes });
                }
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "reading input failed; stopping intake");
                true
            }
        };
        let more_ready = reader.buffer().contains(&b'\n');
        if !chunk.is_empty() && (stop || !more_ready || chunk.len() == SOURCE_CHUNK_MESSAGES) {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(SOURCE_CHUNK_MESSAGES));
            if tx.send(full).await.is_err() {
                return;
            }
        }
        if stop {
            return;
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
    tx: mpsc::Sender<Vec<Message>>,
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
                if tx.send(vec![Message { bytes }]).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn next(rx: &mut mpsc::Receiver<Vec<Message>>) -> Option<Vec<Message>> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the line was held back")
    }

    fn text(chunk: &[Message]) -> Vec<String> {
        chunk
            .iter()
            .map(|m| String::from_utf8(m.bytes.clone()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_file_arrives_in_full_chunks_in_order_and_the_last_one_at_the_end() {
        let n = 3 * SOURCE_CHUNK_MESSAGES + 7;
        let input: String = (0..n).map(|i| format!("{{\"n\":{i}}}\n\n")).collect();
        let (tx, mut rx) = source_channel();
        let (_stop, shutdown) = watch::channel(false);
        let reader = tokio::io::BufReader::with_capacity(1 << 20, std::io::Cursor::new(input));
        tokio::spawn(read_lines(reader, tx, shutdown, Progress::default()));
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(chunk) = rx.recv().await {
            assert!(!chunk.is_empty() && chunk.len() <= SOURCE_CHUNK_MESSAGES);
            sizes.push(chunk.len());
            got.extend(text(&chunk));
        }
        let want: Vec<String> = (0..n).map(|i| format!("{{\"n\":{i}}}")).collect();
        assert_eq!(got, want, "every line once, in order, blank lines skipped");
        assert_eq!(
            sizes,
            vec![256, 256, 256, 7],
            "whole chunks while lines are buffered"
        );
    }

    #[tokio::test]
    async fn a_line_that_arrives_alone_is_not_held_back_for_more() {
        let (mut writer, reader) = tokio::io::duplex(1024);
        let (tx, mut rx) = source_channel();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(read_lines(
            tokio::io::BufReader::new(reader),
            tx,
            shutdown,
            Progress::default(),
        ));
        writer.write_all(b"one\n").await.unwrap();
        assert_eq!(text(&next(&mut rx).await.unwrap()), ["one"]);
        // A complete line and the start of another: the complete one goes out now.
        writer.write_all(b"two\nthr").await.unwrap();
        assert_eq!(text(&next(&mut rx).await.unwrap()), ["two"]);
        writer.write_all(b"ee\n").await.unwrap();
        assert_eq!(text(&next(&mut rx).await.unwrap()), ["three"]);
        // A last line without a newline still arrives at the end of input.
        writer.write_all(b"four").await.unwrap();
        drop(writer);
        assert_eq!(text(&next(&mut rx).await.unwrap()), ["four"]);
        assert!(next(&mut rx).await.is_none());
    }
}
