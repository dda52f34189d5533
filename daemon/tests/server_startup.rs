//! `skillkv serve` started as a process: a missing model or an unusable `--device` ends it with a
//! clear error.

use std::process::Command;

#[test]
fn serve_with_a_missing_model_exits_with_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("skillkv-startup-{}", std::process::id()));
    let missing = dir.join("no-such-model.gguf");
    let output = Command::new(env!("CARGO_BIN_EXE_skillkv"))
        .args(["serve", "--port", "0", "--admin-port", "0", "--model"])
        .arg(&missing)
        .env_remove("SKILLKV_API_KEYS")
        .output()
        .expect("the skillkv binary runs");
    assert!(!output.status.success(), "serve must fail without a model");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-model.gguf"), "stderr: {stderr}");
    assert!(stderr.contains("make model"), "stderr: {stderr}");
}

#[test]
fn serve_on_a_cuda_device_that_cannot_be_used_exits_with_a_clear_error() {
    // Device 4096 exists nowhere, so this fails on every machine: without the `cuda` feature
    // (CPU-only build) or because the driver, NVRTC, cuBLAS or the device is missing.
    let output = Command::new(env!("CARGO_BIN_EXE_skillkv"))
        .args(["serve", "--port", "0", "--admin-port", "0"])
        .args([
            "--device",
            "cuda:4096",
            "--model",
            "/nonexistent/model.gguf",
        ])
        .env_remove("SKILLKV_API_KEYS")
        .output()
        .expect("the skillkv binary runs");
    assert!(!output.status.success(), "serve must refuse the device");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--device cuda:4096"), "stderr: {stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_skillkv"))
        .args(["serve", "--device", "gpu"])
        .output()
        .expect("the skillkv binary runs");
    assert!(!output.status.success(), "`gpu` is not a device");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("auto, cpu, cuda"), "stderr: {stderr}");
}
