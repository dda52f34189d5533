#!/usr/bin/env bash
# Runs the real-cluster suite (e2e/cluster) on a throwaway kind cluster, for users with Docker.
#
#   e2e/kind.sh                 create cluster "skillkv-e2e", run the suite, delete the cluster
#   KEEP_CLUSTER=1 e2e/kind.sh  keep it afterwards
#
# Images: the chart pulls <registry>/skillkv-operator:<tag> and <registry>/skillkv:<tag>. To test
# local builds, tag them and set SKILLKV_E2E_LOAD_IMAGES="img1 img2" (loaded into the nodes with
# `kind load docker-image`), SKILLKV_E2E_IMAGE_REGISTRY and SKILLKV_E2E_IMAGE_TAG.
# The example ModelDeployment reads the model from the node: this script copies it from
# $SKILLKV_MODEL (default ~/.cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf, see
# `make model`) into /var/lib/skillkv/models on every node.
set -euo pipefail

cluster="${SKILLKV_E2E_CLUSTER:-skillkv-e2e}"
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${SKILLKV_MODEL:-$HOME/.cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e/kind.sh: $tool is required" >&2; exit 2; }
done
[[ -f "$model" ]] || { echo "e2e/kind.sh: no model at $model; run 'make model'" >&2; exit 2; }

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s
fi
cleanup() { [[ -n "${KEEP_CLUSTER:-}" ]] || kind delete cluster --name "$cluster"; }
trap cleanup EXIT

export KUBECONFIG="${KUBECONFIG_E2E:-$(mktemp)}"
kind get kubeconfig --name "$cluster" > "$KUBECONFIG"

for node in $(kind get nodes --name "$cluster"); do
  docker exec "$node" mkdir -p /var/lib/skillkv/models /var/lib/skillkv/kv
  docker cp "$model" "$node:/var/lib/skillkv/models/$(basename "$model")"
done
for image in ${SKILLKV_E2E_LOAD_IMAGES:-}; do
  kind load docker-image --name "$cluster" "$image"
done

cd "$root"
[[ -x .venv/bin/python ]] || make venv
.venv/bin/python -m pytest -q -rs e2e/cluster
