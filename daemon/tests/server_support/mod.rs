//! Shared helpers of the tests that run `skillkv serve` as a process: start it on ephemeral
//! ports (reading both addresses from its JSON log) and talk HTTP/1.1 to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The admin token the daemon is started with.
pub const ADMIN_TOKEN: &str = "admin-token-server-tests-1234567890";
/// The API key the daemon is started with.
pub const API_KEY: &str = "api-key-server-tests";

/// The daemon process, killed when dropped.
pub struct Daemon {
    child: Child,
    /// The OpenAI API's address.
    pub public: String,
    /// The admin API's address.
    pub admin: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `skillkv serve` on ephemeral ports and reads both addresses from its JSON log.
pub fn start(model: &Path, dir: &Path) -> Daemon {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).expect("token file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_skillkv"))
        .args(["--log-format", "json", "serve", "--host", "127.0.0.1"])
        .args(["--port", "0", "--admin-port", "0", "--model"])
        .arg(model)
        .arg("--admin-token-file")
        .arg(&token_file)
        .env("SKILLKV_API_KEYS", API_KEY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the skillkv binary runs");
    let stderr = child.stderr.take().expect("stderr piped");
    let (found, addresses) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let fields = &entry["fields"];
            if fields["message"] == "listening" {
                let listener = fields["listener"].as_str().unwrap_or_default().to_string();
                let address = fields["address"].as_str().unwrap_or_default().to_string();
                let _ = found.send((listener, address));
            }
        }
    });
    let (mut public, mut admin) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while public.is_none() || admin.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (listener, address) = addresses
            .recv_timeout(left)
            .expect("the daemon logs both listening addresses within a minute");
        if listener == "admin" {
            admin = Some(address);
        } else {
            public = Some(address);
        }
    }
    Daemon {
        child,
        public: public.expect("public address"),
        admin: admin.expect("admin address"),
    }
}

/// One HTTP/1.1 exchange: status, lower-case headers and the JSON body (`Null` when empty).
pub fn request(
    address: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Value) {
    request_with_headers(address, method, path, token, &[], body)
}

/// [`request`] with more request headers (values as bytes: they need not be text).
pub fn request_with_headers(
    address: &str,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &[u8])],
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Value) {
    let (status, headers, body) = exchange(address, method, path, token, headers, body);
    (
        status,
        headers,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

/// One HTTP/1.1 exchange: status, lower-case headers and the body as text.
pub fn exchange(
    address: &str,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &[u8])],
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, String) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(address).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    )
    .into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body.as_bytes());
    stream.write_all(&head).expect("writes");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reads");
    let (head, body) = response.split_once("\r\n\r\n").expect("a full response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The value of response header `name` (lower case), or "".
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map_or("", |(_, value)| value.as_str())
}

/// Waits (up to a minute) until the daemon answers `/readyz` with 200.
pub fn wait_until_ready(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while request(&daemon.public, "GET", "/readyz", API_KEY, None).0 != 200 {
        assert!(Instant::now() < deadline, "the daemon is not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Puts `desired` as the admin API's desired state, then waits (up to a minute) until
/// `/admin/v1/state` lists `count` skills that all satisfy `settled`; returns them.
pub fn apply_desired(
    daemon: &Daemon,
    desired: &Value,
    count: usize,
    settled: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let (status, _, body) = request(
        &daemon.admin,
        "PUT",
        "/admin/v1/desired",
        ADMIN_TOKEN,
        Some(desired),
    );
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, state) = request(&daemon.admin, "GET", "/admin/v1/state", ADMIN_TOKEN, None);
        let skills = state["skills"].as_array().cloned().unwrap_or_default();
        if skills.len() == count && skills.iter().all(&settled) {
            return skills;
        }
        assert!(Instant::now() < deadline, "skills not settled: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
