"""Fixtures for the API conformance tests: build `skillkv`, start `skillkv serve` on the real
default model on free loopback ports, and hand tests its URLs, keys and log file."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"
MAX_BODY_BYTES = 64 * 1024
MAX_WAITING = 8
MAX_SEQS = 4


def model_path() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = pathlib.Path(os.environ.get("SKILLKV_MODEL", default))
    if not path.is_file():
        pytest.fail(f"model {path} not found: run `make model` first")
    return path


def detector_embeddings_path() -> pathlib.Path:
    """The folder of `make detector-embeddings` (skill detection's semantic checks)."""
    models = pathlib.Path(os.environ.get("SKILLKV_MODEL_DIR", pathlib.Path.home() / ".cache/skillkv/models"))
    path = pathlib.Path(os.environ.get("SKILLKV_DETECTOR_EMBEDDINGS", models / "wordllama-l2-supercat-256"))
    if not (path / "embeddings.safetensors").is_file():
        pytest.fail(f"detector embeddings not found in {path}: run `make detector-embeddings` first")
    return path


def target_dir() -> pathlib.Path:
    if "CARGO_TARGET_DIR" in os.environ:
        return pathlib.Path(os.environ["CARGO_TARGET_DIR"])
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    return pathlib.Path(json.loads(metadata.stdout)["target_directory"])


@pytest.fixture(scope="session")
def skillkv_binary() -> pathlib.Path:
    subprocess.run(
        ["cargo", "build", "-p", "skillkv-daemon", "--all-features", "--bin", "skillkv"],
        cwd=REPO, check=True,
    )
    binary = target_dir() / "debug" / "skillkv"
    assert binary.is_file(), f"cargo build did not produce {binary}"
    return binary


@pytest.fixture(scope="session")
def operator_binary() -> pathlib.Path:
    """`skillkv-operator`, whose `router` subcommand is the router."""
    subprocess.run(
        ["cargo", "build", "-p", "skillkv-operator", "--bin", "skillkv-operator"],
        cwd=REPO, check=True,
    )
    binary = target_dir() / "debug" / "skillkv-operator"
    assert binary.is_file(), f"cargo build did not produce {binary}"
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Daemon:
    process: subprocess.Popen
    base_url: str
    admin_url: str
    log_path: pathlib.Path

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def admin_state(self) -> dict:
        response = httpx.get(
            f"{self.admin_url}/admin/v1/state",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            # The engine answers between forward passes; a long prefill on a busy machine
            # can take seconds.
            timeout=60,
        )
        response.raise_for_status()
        return response.json()

    def wait_for_idle_kv(self, timeout: float = 30.0) -> dict:
        """Polls the admin state until no KV block is used by a sequence and none runs."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.admin_state()["load"]
            if load["usedBlocks"] == 0 and load["running"] == 0 and load["waiting"] == 0:
                return load
            if time.monotonic() > deadline:
                raise AssertionError(f"KV never returned to idle: {load}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        return stop_process(self.process, timeout)


def stop_process(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (unless it already exited), then its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


def wait_until_serving(process: subprocess.Popen, log_path: pathlib.Path, ready, seconds: float,
                       what: str, interval: float) -> None:
    """Polls `ready()` (connection errors count as not yet) until it is true; fails with the
    process's log when it exits first, or stops it and fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}: {log_path.read_text()}")
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_process(process, 60.0)
            raise AssertionError(f"{what} never became ready: {log_path.read_text()}")
        time.sleep(interval)


def start_daemon(binary: pathlib.Path, tmp: pathlib.Path, *extra: str, api_key: str | None = API_KEY) -> Daemon:
    """Starts `skillkv serve` on free ports; `api_key=None` leaves its API open (as behind the
    router, which checks keys itself)."""
    tmp.mkdir(parents=True, exist_ok=True)
    token_file = tmp / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    log_path = tmp / "daemon.log"
    port, admin_port = free_port(), free_port()
    env = dict(os.environ, RUST_LOG="info")
    env.pop("SKILLKV_API_KEYS", None)
    if api_key is not None:
        env["SKILLKV_API_KEYS"] = api_key
    process = subprocess.Popen(
        [
            str(binary), "--log-format", "json", "serve",
            "--model", str(model_path()),
            "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
            "--admin-token-file", str(token_file),
            "--max-body-bytes", str(MAX_BODY_BYTES),
            "--max-waiting", str(MAX_WAITING), "--max-seqs", str(MAX_SEQS),
            "--kv-cache-bytes", str(256 * 1024 * 1024),
            *extra,
        ],
        stdout=subprocess.DEVNULL, stderr=log_path.open("wb"), env=env,
    )
    daemon = Daemon(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log_path)
    wait_until_serving(
        process, log_path, lambda: httpx.get(f"{daemon.base_url}/readyz", timeout=2).status_code == 200,
        seconds=180, what="skillkv", interval=0.1,
    )
    return daemon


@pytest.fixture(scope="session")
def daemon(skillkv_binary, tmp_path_factory):
    daemon = start_daemon(skillkv_binary, tmp_path_factory.mktemp("daemon"))
    yield daemon
    assert daemon.stop() == 0, "skillkv did not exit cleanly on SIGTERM"


@pytest.fixture()
def client(daemon):
    import openai

    return openai.OpenAI(base_url=daemon.api_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_id(daemon) -> str:
    response = httpx.get(
        f"{daemon.api_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()["data"][0]["id"]
