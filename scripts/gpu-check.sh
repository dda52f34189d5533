#!/usr/bin/env bash
# The GPU checks as one prepared run, for a GPU machine that has the NVIDIA driver and CUDA's
# libraries but no Rust toolchain and no network (docs/gpu.md, "Running the GPU checks").
#
#   scripts/gpu-check.sh bundle         # here: the GPU test binaries (feature `cuda`) into .gpu/
#   scripts/gpu-check.sh bundle-model   # here: the default model in two halves, .gpu-model-1/2/
#   scripts/gpu-check.sh run            # there: run them, log to $OUT (or .gpu/out) and stdout
#
# Everything bundled is kept out of git (.git/info/exclude) and travels with the working tree
# (the device tool's `carry`, at most 64 MiB a call). `run` always runs what needs no model
# file — every kernel against its reference, the pool operations, the resident forward pass
# against the host-kernels path on the tiny model, the modular engine cases on CUDA device 0.
# The real model (94 MiB) is too large for one call: carry .gpu-model-1 in one call and
# .gpu-model-2 in the next while the machine is warm (files carried earlier stay there); when
# both halves are there, `run` joins them, checks their SHA-256 and also runs the real-model
# tests of cuda_forward and `skillkv bench engine --device cuda`.
set -euo pipefail

cd "$(dirname "$0")/.."
BUNDLE=.gpu

bundle() {
    grep -qx "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >>.git/info/exclude
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin"
    local json
    json=$(cargo test --release --no-run --message-format=json \
        -p skillkv-kernels -p skillkv-daemon --features skillkv-daemon/cuda,skillkv-kernels/cuda \
        --test gpu_kernels --test gpu_attention --test nvrtc_compile --test cuda_forward --test skills_modular)
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

bundle_model() {
    local model=${SKILLKV_MODEL:-$HOME/.cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf}
    [ -f "$model" ] || { echo "no model at $model: run \`make model\`" >&2; exit 2; }
    local half
    for half in 1 2; do
        grep -qx "/.gpu-model-$half/" .git/info/exclude 2>/dev/null ||
            echo "/.gpu-model-$half/" >>.git/info/exclude
        rm -rf ".gpu-model-$half" && mkdir -p ".gpu-model-$half"
    done
    split -n 2 -d "$model" /tmp/skillkv-model-part.
    mv /tmp/skillkv-model-part.00 .gpu-model-1/part
    mv /tmp/skillkv-model-part.01 .gpu-model-2/part
    sha256sum "$model" | cut -d' ' -f1 >.gpu-model-2/sha256
    du -sh .gpu-model-1 .gpu-model-2
}

# The real model joined from its two halves at $1, when both were carried and match.
join_model() {
    local joined=$1
    [ -f .gpu-model-1/part ] && [ -f .gpu-model-2/part ] || return 1
    cat .gpu-model-1/part .gpu-model-2/part >"$joined"
    [ "$(sha256sum "$joined" | cut -d' ' -f1)" = "$(cat .gpu-model-2/sha256)" ] || {
        echo "the model's halves do not match its SHA-256: carry both again"
        return 1
    }
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
    step "$bin/gpu_attention" --nocapture
    step "$bin/cuda_forward" --nocapture tiny_model
    step "$bin/skills_modular" --nocapture cuda::
    if join_model /tmp/skillkv-model.gguf >>"$log"; then
        export SKILLKV_MODEL=/tmp/skillkv-model.gguf
        step "$bin/cuda_forward" --nocapture --test-threads=1
        step timeout 300 "$bin/skillkv" bench engine --device cuda --repeats 3
    else
        echo "== the real model was not carried: its tests and the benchmark did not run" |
            tee -a "$log"
    fi
    if grep -q "skipped: no GPU" "$log"; then
        echo "gpu-check: some checks did not find the GPU (see 'skipped: no GPU' above)" | tee -a "$log"
        status=1
    fi
    echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)" | tee -a "$log"
    return $status
}

case ${1:-} in
bundle) bundle ;;
bundle-model) bundle_model ;;
run) run ;;
*)
    echo "usage: $0 bundle|bundle-model|run" >&2
    exit 2
    ;;
esac
