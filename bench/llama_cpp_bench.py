#!/usr/bin/env python3
"""Measures llama.cpp (PyPI `llama-cpp-python`) on the engine's speed workloads, so the engine's
numbers can be reported as ratios to llama.cpp measured in the same run on the same machine:

- prefill tok/s of a 2,000-token prompt (evaluated in n_batch-sized chunks);
- single-stream greedy decode tok/s (after a 128-token prompt).

Token ids are the same deterministic sequence the engine's bench uses (`daemon/examples/
forward_bench.rs`): `ids[i] = 100 + (i * 7919) % 20000`, so both runs process the same tokens.

llama-cpp-python compiles llama.cpp on install (10+ minutes on 2 cores), so this is never part of
`make test`; keep it in its own venv (see bench/llama_cpp_tokenize.py for the install line):

    /tmp/llamacpp-venv/bin/python bench/llama_cpp_bench.py [--model PATH] [--threads 2] [--json]

If llama.cpp's AMX buffers crash on this CPU, `--no-extra-bufts` loads without them.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def token_ids(count):
    return [100 + (i * 7919) % 20000 for i in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("SKILLKV_MODEL", str(DEFAULT_MODEL)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=512, help="n_batch (prefill chunk size)")
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs")
    parser.add_argument("--no-extra-bufts", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError as error:
        sys.exit(f"llama-cpp-python is not installed in this interpreter: {error}")
    if not Path(args.model).is_file():
        sys.exit(f"model not found at {args.model}: run `make model`")

    options = dict(
        model_path=args.model,
        n_ctx=max(args.prefill_tokens, args.decode_prompt + args.decode_tokens) + 16,
        n_batch=args.batch,
        n_ubatch=args.batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    if args.no_extra_bufts:
        options["use_extra_bufts"] = False
    llm = Llama(**options)

    prompt = token_ids(args.prefill_tokens)
    prefill_best = None
    for _ in range(args.repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        elapsed = time.perf_counter() - started
        prefill_best = elapsed if prefill_best is None else min(prefill_best, elapsed)

    decode_best = None
    for _ in range(args.repeats):
        llm.reset()
        llm.eval(token_ids(args.decode_prompt))
        started = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        elapsed = time.perf_counter() - started
        decode_best = elapsed if decode_best is None else min(decode_best, elapsed)

    result = {
        "engine": "llama.cpp",
        "threads": args.threads,
        "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": args.prefill_tokens / prefill_best,
        "decode_tokens": args.decode_tokens,
        "decode_tok_s": args.decode_tokens / decode_best,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"llama.cpp prefill {result['prefill_tok_s']:.1f} tok/s "
              f"({args.prefill_tokens} tokens, n_batch {args.batch}, {args.threads} threads)")
        print(f"llama.cpp decode  {result['decode_tok_s']:.1f} tok/s (single stream)")


if __name__ == "__main__":
    main()
