//! A scripted HTTP server for tests of the request loop.
//!
//! It answers every request, on any connection, with the next answer of a
//! fixed script (500 once the script is used up) and records what it was
//! asked, so a test can check both what the client returned and which
//! requests it sent to get there (retries, refreshes). A script entry may
//! be limited to requests whose line (`METHOD /path`) starts with a given
//! prefix ([`Mock::start_matching`]); status 0 closes the connection without
//! answering (a lost answer). Just enough HTTP/1.1 for reqwest: keep-alive,
//! `Content-Length` bodies.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `METHOD /path?query`.
    pub line: String,
    pub body: String,
}

/// A running scripted server.
pub struct Mock {
    /// `127.0.0.1:port`.
    pub addr: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Mock {
    /// Starts a server that answers with `script`, in order: `(status, JSON body)`.
    pub async fn start(script: Vec<(u16, String)>) -> Mock {
        Mock::start_matching(script.into_iter().map(|(status, body)| (String::new(), status, body)).collect()).await
    }

    /// Like [`Mock::start`], each entry `(prefix, status, body)` answering
    /// only a request whose line starts with `prefix`: a request gets the
    /// first unused entry that matches it.
    pub async fn start_matching(script: Vec<(String, u16, String)>) -> Mock {
        Mock::start_matching_at("127.0.0.1:0", script).await
    }

    /// Like [`Mock::start_matching`], listening on `addr`.
    pub async fn start_matching_at(addr: &str, script: Vec<(String, u16, String)>) -> Mock {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let (read, mut write) = conn.into_split();
                    let mut read = BufReader::new(read);
                    while let Some(req) = read_request(&mut read).await {
                        let line = req.line.clone();
                        log.lock().unwrap().push(req);
                        let (status, body) = {
                            let mut script = script.lock().unwrap();
                            match script.iter().position(|(prefix, _, _)| line.starts_with(prefix.as_str())) {
                                Some(i) => script.remove(i).map(|(_, status, body)| (status, body)),
                                None => None,
                            }
                            .unwrap_or((500, r#"{"script":"used up"}"#.into()))
                        };
                        if status == 0 {
                            return; // drop the connection: the answer is lost
                        }
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if write.write_all((head + &body).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Mock { addr, received }
    }

    /// What was received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Reads one request; `None` at the end of the connection.
async fn read_request(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Received> {
    let mut line = String::new();
    if read.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        read.read_line(&mut header).await.ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    read.read_exact(&mut body).await.ok()?;
    let line = line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    Some(Received { line, body: String::from_utf8_lossy(&body).into_owned() })
}
