# skillkv — the commands a developer and CI use. `make help` lists them.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

CARGO      ?= cargo
PYTHON     ?= python3
VENV       ?= .venv
VPY        := $(VENV)/bin/python
MODEL_DIR  ?= $(HOME)/.cache/skillkv/models
export SKILLKV_MODEL_DIR := $(MODEL_DIR)
export SKILLKV_MODEL ?= $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
# Skill detection's static token embeddings (`--detector-embeddings`); the tests look for them here
# ($SKILLKV_MODEL_DIR/wordllama-l2-supercat-256).
DETECTOR_EMBEDDINGS := $(MODEL_DIR)/wordllama-l2-supercat-256

# nextest when installed (it is on the project's machines), cargo test otherwise.
RUST_TEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo "nextest run --no-fail-fast" || echo "test --no-fail-fast")

.PHONY: help test fmt-check clippy rust-test crds crds-check chart-test venv model detector-embeddings run api-test e2e-cluster images image-test bench-routing

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

test: fmt-check clippy crds-check rust-test chart-test api-test e2e-cluster ## everything CI checks
	@echo "make test: all checks passed"

fmt-check: ## rustfmt, checking only
	$(CARGO) fmt --all --check

clippy: ## clippy on every target and feature, warnings are errors
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

rust-test: model detector-embeddings venv ## unit, integration and e2e tests of every crate (NVRTC kernel check with .venv's libnvrtc)
	LD_LIBRARY_PATH="$$($(VPY) -c 'import os, nvidia.cuda_nvrtc as m; print(os.path.join(list(m.__path__)[0], "lib"))')$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" \
	SKILLKV_REQUIRE_NVRTC=1 $(CARGO) $(RUST_TEST) --workspace --all-features

crds: ## regenerate the CRD manifests from the Rust types
	$(CARGO) run --quiet -p skillkv-api --bin crdgen -- .

crds-check: ## fail if the committed CRD manifests drift from the types
	$(CARGO) run --quiet -p skillkv-api --bin crdgen -- --check .

chart-test: venv ## lint and render the Helm chart with Helm's Go SDK, validate every object
	$(VPY) -m pytest -q tests/chart

e2e-cluster: venv ## the real-cluster suite (e2e/cluster); skips, saying why, without KUBECONFIG
	$(VPY) -m pytest -q -rs e2e/cluster

venv: $(VENV)/.installed ## the Python tools the tests use, pinned in requirements-test.txt
$(VENV)/.installed: requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

model: ## fetch the default model (SmolLM2-135M-Instruct Q4_1) into $(MODEL_DIR)
	scripts/fetch-model.sh

detector-embeddings: ## fetch skill detection's static embeddings (WordLlama, PyPI wordllama) into $(DETECTOR_EMBEDDINGS)
	SKILLKV_DETECTOR_EMBEDDINGS="$(DETECTOR_EMBEDDINGS)" scripts/fetch-detector-embeddings.sh

api-test: venv model detector-embeddings ## OpenAI-client conformance, SSE, load and shutdown tests against a real daemon
	$(VPY) -m pytest -q tests/api

# Not part of `make test` (minutes). Extra flags: make bench-routing BENCH_ARGS="--requests 30".
# One compute thread per daemon, as on pods with cores of their own: the in-process daemons
# would otherwise take turns in candle's one shared pool (docs/benchmarks.md, "Routing").
BENCH_ARGS ?=
BENCH_COMPUTE_THREADS ?= 1
bench-routing: ## routing policies side by side on 3 real daemons, and router overhead (bench/routing)
	CANDLE_NUM_THREADS=$(BENCH_COMPUTE_THREADS) nice $(CARGO) run --quiet --release -p skillkv-router --example bench_routing -- $(BENCH_ARGS)

RUN_PORT   ?= 8080
RUN_MODEL_ID = $(basename $(notdir $(SKILLKV_MODEL)))
run: ## release build, fetch the model if missing, serve it on localhost:$(RUN_PORT)
	$(CARGO) build --release -p skillkv-daemon --bin skillkv
	@test -f "$(SKILLKV_MODEL)" || $(MAKE) model
	@test -f "$(DETECTOR_EMBEDDINGS)/embeddings.safetensors" || $(MAKE) detector-embeddings
	@echo "serving $(SKILLKV_MODEL) with the skills in skills/ on http://127.0.0.1:$(RUN_PORT) (Ctrl-C stops it)."
	@echo "The skills prefill first (a progress line per skill; /readyz turns 200 when they are Ready). Try:"
	@echo "  curl -s http://127.0.0.1:$(RUN_PORT)/v1/chat/completions -H 'content-type: application/json' \\"
	@echo "    -d '{\"model\":\"$(RUN_MODEL_ID)\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"max_tokens\":32}'"
	@echo "  python3 -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:$(RUN_PORT)/v1', api_key='none'); \\"
	@echo "    print(c.chat.completions.create(model='$(RUN_MODEL_ID)', messages=[{'role': 'user', 'content': 'Hello!'}]).choices[0].message.content)\""
	@echo "  with a skill: add  \"skills\": [\"debugging\"]  to the JSON body (or extra_body={'skills': ['debugging']})."
	$(CARGO) run --quiet --release -p skillkv-daemon --bin skillkv -- serve --model "$(SKILLKV_MODEL)" --host 127.0.0.1 --port $(RUN_PORT) --skills skills --kv-store $(HOME)/.cache/skillkv/kv-store --detector-embeddings "$(DETECTOR_EMBEDDINGS)"

# Container images (docs/images.md): buildah, daemonless, no registry pulls. Not part of `make
# test` (minutes, and needs root, buildah and busybox-static).
IMAGE_REGISTRY ?= ghcr.io/skillkv
images: ## build the daemon and operator images with buildah, tagged <version> and <version>-<git rev>
	$(CARGO) build --release -p skillkv-daemon -p skillkv-operator --bins --features skillkv-daemon/cuda
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) scripts/images.sh build

image-test: images ## smoke-test the images in a chroot: --version, --help, one chat request; sizes
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) scripts/images-test.sh
