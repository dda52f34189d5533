//! `skillkv chat` as a process on the tiny synthetic model: answers each stdin line, keeps the
//! conversation (so the second turn reuses the first from the prefix cache), resets on `/reset`.

use std::io::Write;
use std::process::{Command, Stdio};

use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};

/// `(prompt tokens, cached tokens)` of every `--stats` line.
fn stats_lines(stdout: &str) -> Vec<(usize, usize)> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix('[')?;
            let (prompt, rest) = rest.split_once(" prompt tokens (")?;
            let (cached, _) = rest.split_once(" cached)")?;
            Some((prompt.parse().ok()?, cached.parse().ok()?))
        })
        .collect()
}

#[test]
fn chat_answers_keeps_history_and_resets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinyModelSpec::default()).expect("write tiny gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_skillkv"))
        .args(["chat", "--max-tokens", "4", "--stats", "--model"])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the skillkv binary runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello there, how are you today?\nand what about tomorrow?\n/reset\nhi\n")
        .expect("write stdin");
    let output = child.wait_with_output().expect("chat exits");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("(conversation reset)"), "stdout: {stdout}");
    let stats = stats_lines(&stdout);
    assert_eq!(stats.len(), 3, "one stats line per answer: {stdout}");
    let (first, second, third) = (stats[0], stats[1], stats[2]);
    assert_eq!(first.1, 0, "nothing is cached before the first turn");
    assert!(second.0 > first.0, "the second turn carries the history");
    assert!(
        second.1 >= 16,
        "the second turn reuses the first turn's full blocks: {second:?}"
    );
    assert!(third.0 < second.0, "after /reset the history is gone");
}

#[test]
fn chat_with_a_missing_model_fails_clearly() {
    let output = Command::new(env!("CARGO_BIN_EXE_skillkv"))
        .args(["chat", "--model", "/nonexistent/model.gguf"])
        .stdin(Stdio::null())
        .output()
        .expect("the skillkv binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/model.gguf"),
        "stderr: {stderr}"
    );
}
