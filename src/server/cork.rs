//! Write coalescing for pipelined requests.
//!
//! hyper flushes after every response. A client that pipelines sends many
//! requests in one packet; hyper answers them one by one from its read
//! buffer, so each answer would cost its own `writev` (and wake the client
//! once per answer). [`Corked`] holds small writes back instead and sends
//! them together once hyper has nothing more to answer right away: when it
//! next reads from the socket, or, if a request is still being worked on,
//! when the connection's task is about to sleep ([`Cork::flush_when_idle`]).
//! A response is never held while the connection waits on anything else.
//!
//! Unlike hyper's own `pipeline_flush`, memory stays bounded: at most
//! [`CORK_LIMIT`] bytes are held, and larger writes (streamed bodies) go
//! straight to the socket.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held back at most: about seven 1-input base64 answers.
pub const CORK_LIMIT: usize = 64 * 1024;

/// Shared by a connection's [`Corked`] socket and the task driving it; both
/// run on that one task, so relaxed ordering is enough.
#[derive(Default)]
pub struct Cork {
    /// The socket holds bytes that hyper considers flushed.
    holding: AtomicBool,
    /// The task is going idle: the next flush must reach the socket.
    release: AtomicBool,
}

impl Cork {
    /// Polls `connection` (hyper's connection future) until it completes,
    /// making sure nothing stays held while it sleeps.
    pub async fn flush_when_idle<F: Future>(self: Arc<Self>, connection: F) -> F::Output {
        let mut connection = std::pin::pin!(connection);
        std::future::poll_fn(|cx| {
            loop {
                let polled = connection.as_mut().poll(cx);
                if polled.is_pending() && self.holding.swap(false, Ordering::Relaxed) {
                    // hyper flushes on every pass: one more pass, right
                    // away, writes the held bytes.
                    self.release.store(true, Ordering::Relaxed);
                    continue;
                }
                return polled;
            }
        })
        .await
    }
}

/// A socket that holds small writes back until [`Cork`] lets them go.
pub struct Corked<T> {
    io: T,
    held: Vec<u8>,
    /// Of `held`, the bytes already written.
    written: usize,
    cork: Arc<Cork>,
}

impl<T> Corked<T> {
    pub fn new(io: T, cork: Arc<Cork>) -> Self {
        Corked {
            io,
            held: Vec::new(),
            written: 0,
            cork,
        }
    }

    fn is_holding(&self) -> bool {
        self.written < self.held.len()
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes out everything held.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.is_holding() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.held.clear();
        self.written = 0;
        self.cork.holding.store(false, Ordering::Relaxed);
        self.cork.release.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    fn fits(&self, len: usize) -> bool {
        self.held.len() + len <= CORK_LIMIT
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // hyper reads only when it has answered everything it had read:
        // whatever is held goes out before waiting for more.
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.fits(len) {
            for b in bufs {
                self.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_holding() && !self.cork.release.load(Ordering::Relaxed) {
            // More answers may follow in this pass; the task lets go of
            // these before it sleeps.
            self.cork.holding.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    /// A corked socket and the client end of its connection.
    fn pair() -> (Corked<DuplexStream>, DuplexStream, Arc<Cork>) {
        let (client, server) = duplex(1 << 20);
        let cork = Arc::new(Cork::default());
        (Corked::new(server, Arc::clone(&cork)), client, cork)
    }

    /// Reads exactly `n` bytes, failing rather than hanging if they never
    /// come.
    async fn receive(client: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the held bytes never arrived")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_next_read_and_keep_their_order() {
        let (mut corked, mut client, cork) = pair();
        corked.write_all(b"first answer;").await.expect("write");
        corked.flush().await.expect("flush");
        corked.write_all(b"second answer").await.expect("write");
        corked.flush().await.expect("flush");
        assert_eq!(corked.held, b"first answer;second answer");
        assert!(cork.holding.load(Ordering::Relaxed));

        // Reading (hyper waiting for the next request) lets them go first.
        client.write_all(b"next request").await.expect("write");
        let mut request = [0; 12];
        corked.read_exact(&mut request).await.expect("read");
        assert_eq!(&request, b"next request");
        assert_eq!(
            receive(&mut client, 26).await,
            b"first answer;second answer"
        );
        assert!(corked.held.is_empty());
        assert!(!cork.holding.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_out_after_what_is_held() {
        let (mut corked, mut client, _cork) = pair();
        corked.write_all(b"head").await.expect("write");
        let body = vec![7u8; CORK_LIMIT + 1];
        corked.write_all(&body).await.expect("write");
        assert!(corked.held.is_empty(), "a large body is never copied");
        let got = receive(&mut client, 4 + body.len()).await;
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &body[..]);
    }

    #[tokio::test]
    async fn held_bytes_never_exceed_the_limit() {
        let (mut corked, mut client, _cork) = pair();
        let answer = vec![1u8; CORK_LIMIT / 3 + 1];
        for _ in 0..3 {
            corked.write_all(&answer).await.expect("write");
            assert!(corked.held.len() <= CORK_LIMIT);
        }
        // The third did not fit: the first two went out, then it did.
        assert!(corked.held.is_empty());
        let got = receive(&mut client, 3 * answer.len()).await;
        assert!(got.iter().all(|&b| b == 1));
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held() {
        let (mut corked, mut client, _cork) = pair();
        corked.write_all(b"last answer").await.expect("write");
        corked.flush().await.expect("flush");
        corked.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"last answer");
    }

    /// A connection that answers, flushes, then waits on something else
    /// (the next pipelined request's handler) must not keep the answer.
    #[tokio::test]
    async fn an_answer_is_not_held_while_the_connection_waits() {
        let (mut corked, mut client, cork) = pair();
        let mut answered = false;
        let connection = poll_fn(move |cx| {
            if !answered {
                let n = ready!(Pin::new(&mut corked).poll_write(cx, b"answer")).expect("write");
                assert_eq!(n, 6);
                answered = true;
            }
            // hyper flushes on every pass, then waits on its handler.
            ready!(Pin::new(&mut corked).poll_flush(cx)).expect("flush");
            Poll::<()>::Pending
        });
        let waiting = tokio::spawn(cork.flush_when_idle(connection));
        assert_eq!(receive(&mut client, 6).await, b"answer");
        waiting.abort();
    }
}
