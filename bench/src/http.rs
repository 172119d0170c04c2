//! A lean HTTP/1.1 client for the all-hit runs: keep-alive connections,
//! each request written as prebuilt bytes and its answer read in the same
//! task; optionally pipelined (several requests written at once on one
//! connection, answers read in order), as the bare Redis client pipelines
//! its commands. A general client (reqwest, or hyper's
//! connection tasks) costs the load generator several times the bare Redis
//! client's CPU per request, and on a shared machine that CPU is taken from
//! the gateway; this one keeps the client's share close to the Redis
//! client's, so the figures show the gateway rather than the client.

use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the POSTs of one send returned, together.
pub struct Answer {
    /// 200 if every answer was; otherwise the first other status.
    pub status: u16,
    /// Whether every `x-embgate-cache` said `hit`.
    pub hit: bool,
    pub body_len: u64,
    /// The start of the first body (of the first non-200 one, if any).
    pub body_head: Bytes,
}

struct Connection {
    stream: TcpStream,
    buf: BytesMut,
}

/// Connections to one gateway, opened up front.
#[derive(Clone)]
pub struct Client {
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl Client {
    /// Opens `concurrency` connections to `authority` (`host:port`).
    pub async fn connect(authority: &str, concurrency: usize) -> Result<Client, String> {
        let mut idle = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let stream = TcpStream::connect(authority)
                .await
                .map_err(|e| format!("connect {authority}: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("nodelay: {e}"))?;
            idle.push(Connection {
                stream,
                buf: BytesMut::with_capacity(64 * 1024),
            });
        }
        Ok(Client {
            idle: Arc::new(Mutex::new(idle)),
        })
    }

    /// Sends `count` requests built by [`request`], concatenated in
    /// `requests`, on one connection and reads their answers.
    pub async fn send(&self, requests: &[u8], count: usize) -> Result<Answer, String> {
        let taken = self.idle.lock().map_err(|_| "poisoned")?.pop();
        let mut conn = taken.ok_or("more requests in flight than connections")?;
        let answer = exchange(&mut conn, requests, count).await;
        // A connection that failed is dropped, not reused.
        if answer.is_ok() {
            self.idle.lock().map_err(|_| "poisoned")?.push(conn);
        }
        answer
    }
}

/// The bytes of a JSON POST to `path` on `authority`.
pub fn request(authority: &str, path: &str, authorization: &str, body: &[u8]) -> Bytes {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\n\
         authorization: {authorization}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out.into()
}

async fn exchange(conn: &mut Connection, requests: &[u8], count: usize) -> Result<Answer, String> {
    conn.stream
        .write_all(requests)
        .await
        .map_err(|e| format!("send: {e}"))?;
    conn.buf.clear();
    let mut all = read_answer(conn).await?;
    for _ in 1..count {
        let next = read_answer(conn).await?;
        all.hit &= next.hit;
        all.body_len += next.body_len;
        if all.status == 200 && next.status != 200 {
            all.status = next.status;
            all.body_head = next.body_head;
        }
    }
    Ok(all)
}

async fn read_answer(conn: &mut Connection) -> Result<Answer, String> {
    // The head.
    let (status, hit, framing) = loop {
        if conn.buf.is_empty() {
            fill(conn).await?;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut head = httparse::Response::new(&mut headers);
        match head
            .parse(&conn.buf)
            .map_err(|e| format!("response head: {e}"))?
        {
            httparse::Status::Partial => {
                fill(conn).await?;
                continue;
            }
            httparse::Status::Complete(len) => {
                let mut framing = None;
                let mut hit = false;
                for h in head.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let n = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or("bad content-length")?;
                        framing = Some(Framing::Length(n));
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        framing = Some(Framing::Chunked);
                    } else if h.name.eq_ignore_ascii_case("x-embgate-cache") {
                        hit = h.value == b"hit";
                    }
                }
                let status = head.code.unwrap_or(0);
                conn.buf.advance(len);
                break (status, hit, framing.ok_or("response without framing")?);
            }
        }
    };
    let mut body = Body::default();
    match framing {
        Framing::Length(n) => body.take_exactly(conn, n).await?,
        Framing::Chunked => loop {
            // A chunk: hex size, CRLF, data, CRLF; size 0 ends the body.
            let line_end = loop {
                if let Some(i) = conn.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(conn).await?;
            };
            let size = std::str::from_utf8(&conn.buf[..line_end])
                .ok()
                .and_then(|s| u64::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or("bad chunk size")?;
            conn.buf.advance(line_end + 2);
            body.take_exactly(conn, size).await?;
            skip_exactly(conn, 2).await?;
            if size == 0 {
                break;
            }
        },
    }
    Ok(Answer {
        status,
        hit,
        body_len: body.len,
        body_head: body.head.freeze(),
    })
}

enum Framing {
    Length(u64),
    Chunked,
}

#[derive(Default)]
struct Body {
    len: u64,
    head: BytesMut,
}

impl Body {
    /// Consumes `n` body bytes, keeping the first few hundred.
    async fn take_exactly(&mut self, conn: &mut Connection, mut n: u64) -> Result<(), String> {
        self.len += n;
        while n > 0 {
            if conn.buf.is_empty() {
                fill(conn).await?;
            }
            let take = (conn.buf.len() as u64).min(n) as usize;
            if self.head.len() < 300 {
                let keep = take.min(300 - self.head.len());
                self.head.extend_from_slice(&conn.buf[..keep]);
            }
            conn.buf.advance(take);
            n -= take as u64;
        }
        Ok(())
    }
}

/// Consumes `n` framing bytes.
async fn skip_exactly(conn: &mut Connection, n: usize) -> Result<(), String> {
    while conn.buf.len() < n {
        fill(conn).await?;
    }
    conn.buf.advance(n);
    Ok(())
}

/// Reads more of the answer into the connection's buffer.
async fn fill(conn: &mut Connection) -> Result<(), String> {
    if conn.buf.capacity() - conn.buf.len() < 16 * 1024 {
        conn.buf.reserve(64 * 1024);
    }
    match conn.stream.read_buf(&mut conn.buf).await {
        Ok(0) => Err("connection closed mid-answer".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("receive: {e}")),
    }
}
