//! `skillkv serve` on the tiny synthetic model as the router uses it: a request that names no
//! skills but carries the router's detection (`x-skillkv-detected-skills`) is served with
//! exactly those skills — the ones this daemon has — and says `selection=routed`, so a
//! request gets the skills it was routed for even where the daemon's own detection would
//! choose others. Without the header the daemon detects for itself; a request that names its
//! skills is served with those whatever the header says; a header that is not text is a 400
//! in OpenAI's error shape; `skillkv_skill_selections_total` counts each way of choosing.

mod server_support;

use serde_json::{Value, json};
use skillkv_api::skills::DETECTED_SKILLS_HEADER;
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};

use server_support::{
    API_KEY, apply_desired, exchange, header, request_with_headers, start, wait_until_ready,
};

/// A pinned skill whose card is about `topic` (its keywords).
fn skill(name: &str, topic: &str) -> Value {
    let body: String = (0..6)
        .map(|i| format!("Rule {i}: check the {topic} carefully. "))
        .collect();
    json!({
        "name": name,
        "content": format!(
            "---\nname: {name}\ndescription: Use for {topic}.\nkeywords: [{topic}]\n---\n{body}\n"
        ),
    })
}

#[test]
fn the_routers_detection_is_served_when_the_request_names_no_skills() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("tiny-routed.gguf");
    write_tiny_gguf(&model, &TinyModelSpec::default()).expect("tiny model");
    let daemon = start(&model, dir.path());
    wait_until_ready(&daemon);
    let desired = json!({
        "generation": 1,
        "skills": [skill("alpha", "caches"), skill("beta", "queues")],
    });
    apply_desired(&daemon, &desired, 2, |s| s["state"] == "Ready");

    let chat = |skills: Option<Value>, detected: Option<&[u8]>| {
        let mut body = json!({
            "model": "tiny-routed",
            "messages": [{"role": "user", "content": "my queues back up under load"}],
            "max_tokens": 2,
        });
        if let Some(skills) = skills {
            body["skills"] = skills;
        }
        let headers: Vec<(&str, &[u8])> = detected
            .map(|value| (DETECTED_SKILLS_HEADER, value))
            .into_iter()
            .collect();
        request_with_headers(
            &daemon.public,
            "POST",
            "/v1/chat/completions",
            API_KEY,
            &headers,
            Some(&body),
        )
    };
    let served_as = |headers: &[(String, String)], expected: &str| {
        let cache = header(headers, "x-skillkv-cache");
        assert!(cache.starts_with(expected), "{cache}");
    };

    // On its own the daemon detects beta in this text.
    let (status, headers, body) = chat(None, None);
    assert_eq!(status, 200, "{body}");
    served_as(&headers, "mode=exact; skills=beta; selection=detected;");
    // The router chose alpha (and a skill this daemon lacks): alpha is served, as detected.
    let (status, headers, body) = chat(None, Some(b"alpha, not-on-this-daemon"));
    assert_eq!(status, 200, "{body}");
    served_as(
        &headers,
        "mode=exact; skills=alpha; selection=routed; warm=alpha;",
    );
    // The router detected nothing: no skill, not the daemon's own choice.
    let (status, headers, body) = chat(Some(json!("auto")), Some(b""));
    assert_eq!(status, 200, "{body}");
    served_as(&headers, "mode=exact; skills=none; selection=routed;");
    // Named skills are served whatever the header says.
    let (status, headers, body) = chat(Some(json!(["beta"])), Some(b"alpha"));
    assert_eq!(status, 200, "{body}");
    served_as(&headers, "mode=exact; skills=beta; selection=named;");
    // A header that is not text is refused, naming the header.
    let (status, _, body) = chat(None, Some(b"alpha\xff"));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(DETECTED_SKILLS_HEADER), "{message}");

    // Each served request is counted by how its skills were chosen; the refused one is not.
    let (status, _, metrics) = exchange(&daemon.public, "GET", "/metrics", API_KEY, &[], None);
    assert_eq!(status, 200);
    for (selection, count) in [("detected", 1), ("routed", 2), ("named", 1)] {
        let line = format!("skillkv_skill_selections_total{{selection=\"{selection}\"}} {count}");
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
}
