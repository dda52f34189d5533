//! `skillkv serve` on the tiny synthetic model with a `modular` skill from the admin API's
//! desired state: the response says which assembly mode served it, and
//! `usage.prompt_tokens_details.cached_tokens` counts only the exact reuse of the first skill. A
//! modular skill the daemon only knows (`pin: false`) is prefilled on its own into the prefix
//! cache by the first request that uses it, and the next request finds it there.

mod server_support;

use serde_json::{Value, json};
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};

use server_support::{API_KEY, apply_desired, exchange, header, request, start, wait_until_ready};

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
    wait_until_ready(&daemon);

    let desired = json!({
        "generation": 1,
        "skills": [
            skill("alpha", "caches", "exact"),
            skill("beta", "queues", "modular"),
            unpinned(skill("gamma", "sockets", "modular")),
        ],
    });
    let skills = apply_desired(&daemon, &desired, 3, |s| match s["name"].as_str() {
        Some("gamma") => s["state"] == "Unpinned",
        _ => s["state"] == "Ready",
    });
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
    let (status, _, metrics) = exchange(&daemon.public, "GET", "/metrics", API_KEY, &[], None);
    assert_eq!(status, 200);
    for outcome in ["prefilled", "cached"] {
        let line = format!("skillkv_unpinned_skill_prefills_total{{outcome=\"{outcome}\"}} 1");
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
}
