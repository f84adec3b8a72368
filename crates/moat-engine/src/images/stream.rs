//! A layer's bytes handed from the download (async) to the unpacker (a blocking thread) as
//! they arrive, so that a pull reads each blob once, with no copy of it on disk.
//!
//! The channel is bounded ([`STREAM_CHUNKS`] chunks): a slow unpacker holds the download
//! back. Either side going away ends the other: a dropped writer is the end of the stream
//! for the reader, a dropped reader makes the writer's next write fail.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// Chunks in flight between the download and the unpacker, at most.
pub(super) const STREAM_CHUNKS: usize = 16;

/// A connected writer and reader.
pub(super) fn channel() -> (ChannelWriter, ChannelReader) {
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
    (
        ChannelWriter {
            tx: PollSender::new(tx),
        },
        ChannelReader {
            rx,
            chunk: Bytes::new(),
        },
    )
}

/// The download's side.
pub(super) struct ChannelWriter {
    tx: PollSender<Bytes>,
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.tx.poll_reserve(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the layer's unpacking stopped",
            ))),
            Poll::Ready(Ok(())) => match self.tx.send_item(Bytes::copy_from_slice(buf)) {
                Ok(()) => Poll::Ready(Ok(buf.len())),
                Err(_) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the layer's unpacking stopped",
                ))),
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The unpacker's side: blocking reads, for a blocking thread only.
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                // The writer is gone: the end of the stream (the download says whether it
                // was complete).
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_cross_in_order_and_either_end_stops_the_other() {
        let (mut w, mut r) = channel();
        let reader = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        for i in 0..100u8 {
            w.write_all(&[i; 1000]).await.unwrap();
        }
        drop(w);
        let all = reader.await.unwrap();
        assert_eq!(all.len(), 100_000);
        assert!(
            all.chunks(1000)
                .enumerate()
                .all(|(i, c)| c.iter().all(|b| usize::from(*b) == i))
        );

        let (mut w, r) = channel();
        drop(r);
        assert!(w.write_all(b"x").await.is_err());
    }
}
