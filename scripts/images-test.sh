#!/usr/bin/env bash
# Smoke test of the images `scripts/images.sh` built (`make image-test`, docs/images.md). For
# each image it mounts the root file system (`buildah from` + `buildah mount`) and runs the
# binaries inside it with `chroot`, as the image's user (65532) and with only the image's
# environment (so LD_LIBRARY_PATH, ENTRYPOINT and USER are what is tested):
#   both:     labels, user, entrypoint; `--version` (the crate version), `--help`; every shared
#             library the binaries need resolves inside the image (ld.so --list)
#   operator: `controller --help`, `router --help`; no shell in the image
#   daemon:   the NVRTC and cuBLAS libraries load their dependencies from the image;
#             `skillkv serve` on the tiny synthetic model (daemon/examples/write_tiny_gguf.rs),
#             with a read-only root file system, answers one OpenAI chat request and
#             /v1/models on loopback, then shuts down cleanly on SIGTERM;
#             the operator's fetch-model init script (hf:// models) downloads a file with the
#             image's sh, curl and sha256sum from a local HTTP server, and rejects a wrong hash
# Finally it prints the image sizes. Needs root (chroot, mount), buildah, python3, curl, cargo.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

REGISTRY=${IMAGE_REGISTRY:-ghcr.io/skillkv}
REGISTRY=${REGISTRY%/}
BUILDAH=(buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}")
read -r VERSION _ < <(scripts/images.sh version)
DAEMON=$REGISTRY/skillkv:$VERSION
OPERATOR=$REGISTRY/skillkv-operator:$VERSION
CHROOT=$(command -v chroot) # absolute: env -i runs it with the image's PATH
SCRATCH=$(mktemp -d -t skillkv-image-test.XXXXXX)

CONTAINERS=()
MOUNTS=()
PIDS=()
cleanup() {
    local pid ctr i
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || true; done
    for ctr in "${CONTAINERS[@]}"; do
        "${BUILDAH[@]}" umount "$ctr" >/dev/null 2>&1 || true
        "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true
    done
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

FAILED=0
pass() { echo "  ok    $*"; }
fail() {
    echo "  FAIL  $*" >&2
    FAILED=1
}
# check DESCRIPTION COMMAND...: pass when COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@" >"$SCRATCH/out" 2>&1; then pass "$what"; else
        fail "$what"
        sed 's/^/        /' "$SCRATCH/out" >&2
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until URL answers 200, at most $2 seconds, while process $3 is alive.
wait_ready() {
    local url=$1 deadline=$((SECONDS + $2)) pid=${3:-}
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Mounts IMAGE's root file system; sets MNT, IMAGE_ENV (its Env) and IMAGE_USER.
open_image() {
    local image=$1 ctr
    "${BUILDAH[@]}" inspect --type image "$image" >/dev/null 2>&1 ||
        { echo "image-test: $image not found; run make images first" >&2; exit 1; }
    ctr=$("${BUILDAH[@]}" from "$image")
    CONTAINERS+=("$ctr")
    MNT=$("${BUILDAH[@]}" mount "$ctr")
    mapfile -t IMAGE_ENV < <("${BUILDAH[@]}" inspect --type image \
        --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$image" | sed '/^$/d')
    IMAGE_USER=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
    # What a container runtime provides: /proc, /dev.
    mkdir -p "$MNT/proc" "$MNT/dev"
    mount -t proc proc "$MNT/proc" && MOUNTS+=("$MNT/proc")
    mount --bind /dev "$MNT/dev" && MOUNTS+=("$MNT/dev")
}

# Runs a command in ROOT_FS (default MNT) as the image's user with only its environment (plus
# EXTRA_ENV and the HOSTNAME a container runtime sets).
EXTRA_ENV=()
in_image() {
    env -i "${IMAGE_ENV[@]}" "${EXTRA_ENV[@]}" HOSTNAME=image-test "$CHROOT" --userspec="$IMAGE_USER" "${ROOT_FS:-$MNT}" "$@"
}

inspect() { "${BUILDAH[@]}" inspect --type image --format "$2" "$1"; }

common_checks() {
    local image=$1 binary=$2 name=$3
    check "user is 65532:65532" test "$IMAGE_USER" = 65532:65532
    check "entrypoint is [$binary]" \
        test "$(inspect "$image" '{{.OCIv1.Config.Entrypoint}}')" = "[$binary]"
    check "label version = $VERSION" \
        test "$(inspect "$image" '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}')" = "$VERSION"
    local rev
    rev=$(inspect "$image" '{{index .OCIv1.Config.Labels "org.opencontainers.image.revision"}}')
    check "label revision ($rev) is also a tag" "${BUILDAH[@]}" inspect --type image "$image-$rev"
    check "labels source and licenses" test -n "$(inspect "$image" \
        '{{index .OCIv1.Config.Labels "org.opencontainers.image.source"}}{{index .OCIv1.Config.Labels "org.opencontainers.image.licenses"}}')"
    check "libraries of $binary resolve in the image" no_missing_libs "$binary"
    check "$name --version prints $VERSION" grep_output "$name $VERSION" "$binary" --version
    check "$name --help" in_image "$binary" --help
}

# ld.so --list inside the image: fails on any "not found".
no_missing_libs() {
    local lib out
    for lib in "$@"; do
        out=$(in_image /lib64/ld-linux-x86-64.so.2 --list "$lib") || { echo "$out"; return 1; }
        if grep -q "not found" <<<"$out"; then echo "$lib: $out"; return 1; fi
    done
}

grep_output() {
    local want=$1 out
    shift
    out=$(in_image "$@")
    grep -qF "$want" <<<"$out" || { echo "wanted '$want' in: $out"; return 1; }
}

test_operator() {
    echo "== $OPERATOR"
    open_image "$OPERATOR"
    local bin=/usr/local/bin/skillkv-operator
    common_checks "$OPERATOR" "$bin" skillkv-operator
    check "skillkv-operator controller --help" in_image "$bin" controller --help
    check "skillkv-operator router --help" in_image "$bin" router --help
    check "no shell in the image" test ! -e "$MNT/usr/bin/sh" -a ! -e "$MNT/bin/sh"
}

# The daemon serves one chat request on the tiny model from a read-only root file system.
serve_tiny() {
    local ro=$SCRATCH/ro port admin pid
    mkdir -p "$MNT/models" "$ro"
    cargo run --quiet -p skillkv-daemon --example write_tiny_gguf -- "$MNT/models/tiny.gguf" \
        >/dev/null || return 1
    chmod 0644 "$MNT/models/tiny.gguf"
    mount --bind "$MNT" "$ro" && MOUNTS+=("$ro") || return 1
    mount -o remount,ro,bind "$ro" || return 1
    mount -t proc proc "$ro/proc" && MOUNTS+=("$ro/proc") || return 1
    mount --bind /dev "$ro/dev" && MOUNTS+=("$ro/dev") || return 1
    port=$(free_port)
    admin=$(free_port)
    # Not through in_image: $! must be the daemon (env and chroot exec it).
    env -i "${IMAGE_ENV[@]}" HOSTNAME=image-test "$CHROOT" --userspec="$IMAGE_USER" "$ro" \
        /usr/local/bin/skillkv serve --host 127.0.0.1 --port "$port" --admin-port "$admin" \
        --model /models/tiny.gguf --kv-cache-bytes $((16 * 1024 * 1024)) \
        >"$SCRATCH/daemon.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if ! wait_ready "http://127.0.0.1:$port/readyz" 120 "$pid"; then
        echo "daemon did not become ready:"
        cat "$SCRATCH/daemon.log"
        return 1
    fi
    curl -fsS "http://127.0.0.1:$port/v1/models" >"$SCRATCH/models.json" || return 1
    curl -fsS "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
        -d '{"model":"tiny","messages":[{"role":"user","content":"Hello!"}],"max_tokens":8}' \
        >"$SCRATCH/chat.json" || return 1
    python3 - "$SCRATCH/models.json" "$SCRATCH/chat.json" <<'EOF' || return 1
import json, sys
models = json.load(open(sys.argv[1]))
assert [m["id"] for m in models["data"]] == ["tiny"], models
chat = json.load(open(sys.argv[2]))
assert chat["object"] == "chat.completion", chat
assert chat["model"] == "tiny", chat
choice = chat["choices"][0]
assert choice["message"]["role"] == "assistant", chat
assert choice["finish_reason"] in ("stop", "length"), chat
assert 1 <= chat["usage"]["completion_tokens"] <= 8, chat
assert chat["usage"]["prompt_tokens"] > 0, chat
print("chat reply:", repr(choice["message"]["content"]), chat["usage"])
EOF
    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "daemon exited $status after SIGTERM"
        cat "$SCRATCH/daemon.log"
        return 1
    fi
}

# The fetch-model init container's script, as operator/src/build/model_source.rs writes it for
# hf://org/repo/sub/m.gguf (keep in step; the grep below notices when its tools change).
fetch_script() {
    local target=$1 verify=$2
    printf '%s' "set -eu; target='$target'; if [ -s \"\$target\" ]; then exit 0; fi; \
mkdir -p \"\$(dirname \"\$target\")\"; tmp=\"\$target.partial.\$HOSTNAME\"; \
curl -fsSL --retry 5 -o \"\$tmp\" \"\${HF_ENDPOINT:-https://huggingface.co}/org/repo/resolve/main/sub/m.gguf\"$verify \
&& mv \"\$tmp\" \"\$target\""
}

fetch_model() {
    if ! grep -q 'curl -fsSL --retry 5 -o' operator/src/build/model_source.rs ||
        ! grep -q 'sha256sum -c -' operator/src/build/model_source.rs; then
        echo "model_source.rs changed its fetch script; update fetch_script here"
        return 1
    fi
    local serve=$SCRATCH/hf port pid sha
    mkdir -p "$serve/org/repo/resolve/main/sub" "$MNT/cache"
    chown 65532:65532 "$MNT/cache"
    head -c 100000 /dev/urandom >"$serve/org/repo/resolve/main/sub/m.gguf"
    sha=$(sha256sum "$serve/org/repo/resolve/main/sub/m.gguf" | cut -d' ' -f1)
    port=$(free_port)
    python3 -m http.server --bind 127.0.0.1 --directory "$serve" "$port" >"$SCRATCH/http.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "http://127.0.0.1:$port/org/repo/resolve/main/sub/m.gguf" 30 "$pid" || return 1
    local verify=" && echo '$sha  '\"\$tmp\" | sha256sum -c -"
    local zeros bad
    zeros=$(printf '0%.0s' {1..64})
    bad=" && echo '$zeros  '\"\$tmp\" | sha256sum -c -"
    # A wrong pin: fails, leaves no model behind.
    local EXTRA_ENV=(HF_ENDPOINT="http://127.0.0.1:$port")
    if in_image sh -c "$(fetch_script /cache/bad/m.gguf "$bad")"; then
        echo "a wrong sha256 was accepted"
        return 1
    fi
    test ! -e "$MNT/cache/bad/m.gguf" || { echo "a wrong sha256 left the model in place"; return 1; }
    in_image sh -c "$(fetch_script /cache/org/repo/sub/m.gguf "$verify")" || return 1
    cmp "$serve/org/repo/resolve/main/sub/m.gguf" "$MNT/cache/org/repo/sub/m.gguf"
}

test_daemon() {
    echo "== $DAEMON"
    open_image "$DAEMON"
    local bin=/usr/local/bin/skillkv
    common_checks "$DAEMON" "$bin" skillkv
    check "skillkv serve --help" in_image "$bin" serve --help
    local lib libs=()
    for lib in "$MNT"/opt/skillkv/cuda/lib/*.so*; do libs+=("/opt/skillkv/cuda/lib/${lib##*/}"); done
    check "CUDA libraries present (${#libs[@]})" test "${#libs[@]}" -ge 4
    check "CUDA libraries' dependencies resolve in the image" no_missing_libs "${libs[@]}"
    check "LD_LIBRARY_PATH names the CUDA libraries" grep -q 'LD_LIBRARY_PATH=/opt/skillkv/cuda/lib' \
        <(printf '%s\n' "${IMAGE_ENV[@]}")
    check "curl in the image runs" in_image curl --version
    check "fetch-model init script (hf://) with the image's sh, curl, sha256sum" fetch_model
    check "serve the tiny model read-only: /v1/models, one chat completion, SIGTERM" serve_tiny
    sed -n 's/^/        /; /chat reply/p' "$SCRATCH/out"
}

test_operator
test_daemon

echo "== sizes"
"${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}  {{.Size}}' | grep -E "^($DAEMON|$OPERATOR) " || true

if ((FAILED)); then
    echo "image-test: FAILED" >&2
    exit 1
fi
echo "image-test: all checks passed"
