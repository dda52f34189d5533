#!/usr/bin/env bash
# The GPU checks as one prepared run, for a GPU machine that has the NVIDIA driver and CUDA's
# libraries but no Rust toolchain and no network (docs/gpu.md, "Running the GPU checks").
#
#   scripts/gpu-check.sh bundle   # here: build the GPU test binaries (feature `cuda`) into .gpu/
#   scripts/gpu-check.sh run      # there: run them, log to $OUT (or .gpu/out) and stdout
#
# `bundle` keeps .gpu/ out of git (.git/info/exclude) and prints its size: it travels with the
# working tree (the device tool's `carry`). `run` needs no model file: the real-model tests of
# cuda_forward are left out (the model is larger than what travels); everything else that
# needs a GPU runs — every kernel against its reference, the pool operations, the resident
# forward pass against the host-kernels path on the tiny model, and the modular engine cases on
# CUDA device 0.
set -euo pipefail

cd "$(dirname "$0")/.."
BUNDLE=.gpu

bundle() {
    grep -qx "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >>.git/info/exclude
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin"
    local json
    json=$(cargo test --release --no-run --message-format=json \
        -p skillkv-kernels -p skillkv-daemon --features skillkv-daemon/cuda,skillkv-kernels/cuda \
        --test gpu_kernels --test nvrtc_compile --test cuda_forward --test skills_modular)
    python3 -c '
import json, shutil, subprocess, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") != "compiler-artifact" or not message.get("executable"):
        continue
    name = message["target"]["name"]
    path = sys.argv[1] + "/" + name
    shutil.copy(message["executable"], path)
    subprocess.run(["strip", path], check=True)
    print("bundled", name)
' "$BUNDLE/bin" <<<"$json"
    du -sh "$BUNDLE"
}

# Makes NVRTC and cuBLAS (CUDA 12 or 13, from the toolkit or from pip's nvidia-* wheels) loadable
# under the names cudarc (built for CUDA 12.8) looks for: each library's own folder goes on
# LD_LIBRARY_PATH (NVRTC opens its builtins from there by exact version) and `$links` gets an
# unversioned link, since cudarc does not try `.so.13`.
find_libraries() {
    local links=$1 name found
    mkdir -p "$links"
    for name in libnvrtc libcublas libcublasLt; do
        found=$({
            ls /usr/local/cuda*/lib64/"$name".so.* /usr/local/cuda*/targets/*/lib/"$name".so.* 2>/dev/null
            python3 -c 'import glob, site; [print(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/'"$name"'.so.*")]' 2>/dev/null
            ldconfig -p 2>/dev/null | awk -v n="$name.so." 'index($1, n) == 1 {print $NF}'
        } | grep -v '\.alt\.' | head -1 || true)
        if [ -n "$found" ]; then
            ln -sf "$found" "$links/$name.so"
            LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            echo "library $name: $found"
        else
            echo "library $name: not found"
        fi
    done
    export LD_LIBRARY_PATH=$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

run() {
    local out=${OUT:-$BUNDLE/out} bin=$BUNDLE/bin
    [ -d "$bin" ] || { echo "no $bin: run \`scripts/gpu-check.sh bundle\` first" >&2; exit 2; }
    mkdir -p "$out"
    local log=$out/gpu-check.log status=0
    : >"$log"
    step() {
        echo "== $*" | tee -a "$log"
        if ! "$@" 2>&1 | tee -a "$log"; then
            status=1
        fi
    }
    step nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv
    find_libraries /tmp/skillkv-cuda-libs >"$out/libraries.txt"
    tee -a "$log" <"$out/libraries.txt"
    export SKILLKV_REQUIRE_NVRTC=1 RUST_BACKTRACE=1
    step "$bin/nvrtc_compile" --nocapture
    step "$bin/gpu_kernels" --nocapture --test-threads=1
    step "$bin/cuda_forward" --nocapture tiny_model
    step "$bin/skills_modular" --nocapture cuda::
    if grep -q "skipped: no GPU" "$log"; then
        echo "gpu-check: some checks did not find the GPU (see 'skipped: no GPU' above)" | tee -a "$log"
        status=1
    fi
    echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)" | tee -a "$log"
    return $status
}

case ${1:-} in
bundle) bundle ;;
run) run ;;
*)
    echo "usage: $0 bundle|run" >&2
    exit 2
    ;;
esac
