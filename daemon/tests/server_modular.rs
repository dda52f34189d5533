//! `skillkv serve` on the tiny synthetic model with a `modular` skill from the admin API's
//! desired state: the response says which assembly mode served it, and
//! `usage.prompt_tokens_details.cached_tokens` counts only the exact reuse of the first skill. A
//! modular skill the daemon only knows (`pin: false`) is prefilled on its own into the prefix
//! cache by the first request that uses it, and the next request finds it there.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};

const ADMIN_TOKEN: &str = "admin-token-modular-1234567890";
const API_KEY: &str = "api-key-modular";

/// The daemon process, killed when dropped.
struct Daemon {
    child: Child,
    public: String,
    admin: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `skillkv serve` on ephemeral ports and reads both addresses from its JSON log.
fn start(model: &Path, dir: &Path) -> Daemon {
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
fn request(
    address: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Value) {
    let (status, headers, body) = exchange(address, method, path, token, body);
    (
        status,
        headers,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

/// One HTTP/1.1 exchange: status, lower-case headers and the body as text.
fn exchange(
    address: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, String) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(address).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("writes");
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

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map_or("", |(_, value)| value.as_str())
}

fn unpinned(mut skill: Value) -> Value {
    skill["pin"] = json!(false);
    skill
}

fn skill(name: &str, topic: &str, assembly: &str) -> Value {
    let body: String = (0..8)
        .map(|i| format!("Rule {i} about {topic}: check the {topic} carefully. "))
        .collect();
    json!({
        "name": name,
        "content": format!("---\nname: {name}\ndescription: about {topic}\n---\n{body}\n"),
        "assembly": assembly,
    })
}

#[test]
fn a_modular_skill_is_reported_and_not_counted_as_cached() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("tiny-modular.gguf");
    write_tiny_gguf(&model, &TinyModelSpec::default()).expect("tiny model");
    let daemon = start(&model, dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    while request(&daemon.public, "GET", "/readyz", API_KEY, None).0 != 200 {
        assert!(Instant::now() < deadline, "the daemon is not ready");
        std::thread::sleep(Duration::from_millis(50));
    }

    let desired = json!({
        "generation": 1,
        "skills": [
            skill("alpha", "caches", "exact"),
            skill("beta", "queues", "modular"),
            unpinned(skill("gamma", "sockets", "modular")),
        ],
    });
    let (status, _, _) = request(
        &daemon.admin,
        "PUT",
        "/admin/v1/desired",
        ADMIN_TOKEN,
        Some(&desired),
    );
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    let skills = loop {
        let (_, _, state) = request(&daemon.admin, "GET", "/admin/v1/state", ADMIN_TOKEN, None);
        let skills = state["skills"].as_array().cloned().unwrap_or_default();
        let settled = |s: &Value| match s["name"].as_str() {
            Some("gamma") => s["state"] == "Unpinned",
            _ => s["state"] == "Ready",
        };
        if skills.len() == 3 && skills.iter().all(settled) {
            break skills;
        }
        assert!(Instant::now() < deadline, "skills not Ready: {state}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let alpha_tokens = skills
        .iter()
        .find(|s| s["name"] == "alpha")
        .and_then(|s| s["tokens"].as_u64())
        .expect("alpha's tokens");
    assert!(alpha_tokens >= 32, "{skills:?}");

    let chat = |names: Value| {
        let body = json!({
            "model": "tiny-modular",
            "messages": [{"role": "user", "content": "hello there"}],
            "skills": names,
            "max_tokens": 2,
        });
        request(
            &daemon.public,
            "POST",
            "/v1/chat/completions",
            API_KEY,
            Some(&body),
        )
    };
    // beta comes after alpha: it is copied from its own KV.
    let (status, headers, body) = chat(json!(["beta", "alpha"]));
    assert_eq!(status, 200, "{body}");
    let cache = header(&headers, "x-skillkv-cache");
    assert!(
        cache.starts_with("mode=modular; skills=alpha,beta;"),
        "{cache}"
    );
    let pinned_alpha = alpha_tokens / 16 * 16;
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"], pinned_alpha,
        "only alpha's exact prefix counts as cached: {body}"
    );
    assert!(body["usage"]["prompt_tokens"].as_u64() > Some(2 * pinned_alpha));

    // Alone, the modular skill is first: exact assembly.
    let (status, headers, body) = chat(json!(["beta"]));
    assert_eq!(status, 200, "{body}");
    let cache = header(&headers, "x-skillkv-cache");
    assert!(cache.starts_with("mode=exact; skills=beta;"), "{cache}");

    // gamma is pinned nowhere: the first request prefills it on its own (not found cached),
    // the next one finds its KV in the prefix cache. The daemon reports the hash of its last
    // full block so that a router can tell.
    let gamma = skills.iter().find(|s| s["name"] == "gamma").expect("gamma");
    assert_eq!(
        gamma["lastBlock"].as_str().map(str::len),
        Some(64),
        "{gamma}"
    );
    let (status, headers, body) = chat(json!(["alpha", "gamma"]));
    assert_eq!(status, 200, "{body}");
    let cache = header(&headers, "x-skillkv-cache");
    assert!(
        cache.starts_with("mode=modular; skills=alpha,gamma;")
            && cache.ends_with("warm=alpha; cached=none"),
        "{cache}"
    );
    let (status, headers, body) = chat(json!(["alpha", "gamma"]));
    assert_eq!(status, 200, "{body}");
    let cache = header(&headers, "x-skillkv-cache");
    assert!(cache.ends_with("warm=alpha; cached=gamma"), "{cache}");
    let (status, _, metrics) = exchange(&daemon.public, "GET", "/metrics", API_KEY, None);
    assert_eq!(status, 200);
    for outcome in ["prefilled", "cached"] {
        let line = format!("skillkv_unpinned_skill_prefills_total{{outcome=\"{outcome}\"}} 1");
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
}
