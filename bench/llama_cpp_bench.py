#!/usr/bin/env python3
"""Measures llama.cpp (PyPI `llama-cpp-python`) on the engine's speed workloads and, with
`--skillkv BIN`, runs `BIN bench engine --json` in the same run and prints the ratios against the
engine targets of issue 3:

- prefill tok/s of a 2,000-token prompt (evaluated in n_batch-sized chunks);
- single-stream greedy decode tok/s (after a 128-token prompt);
- skillkv's aggregate decode at 8 streams against llama.cpp's single stream;
- skillkv's cached-prefix vs cold time to first token.

Token ids are the same deterministic sequence `skillkv bench engine` uses:
`ids[i] = 100 + (i * 7919) % 20000`, so both runs process the same tokens. Figures are medians
of `--repeats` runs; the two engines run one after the other, never at the same time.

llama-cpp-python compiles llama.cpp on install (10+ minutes on 2 cores), so this is never part of
`make test`; keep it in its own venv (see bench/llama_cpp_tokenize.py for the install line):

    /tmp/llamacpp-venv/bin/python bench/llama_cpp_bench.py --skillkv target/release/skillkv

If llama.cpp's AMX buffers crash on this CPU, `--no-extra-bufts` loads without them.
"""

import argparse
import json
import os
import statistics
import subprocess
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
    parser.add_argument("--repeats", type=int, default=3, help="median of N runs")
    parser.add_argument("--skillkv", help="the skillkv binary: also run `skillkv bench engine`")
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
    prefill_times = []
    for _ in range(args.repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill_times.append(time.perf_counter() - started)

    decode_times = []
    for _ in range(args.repeats):
        llm.reset()
        llm.eval(token_ids(args.decode_prompt))
        started = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        decode_times.append(time.perf_counter() - started)
    del llm

    result = {
        "engine": "llama.cpp",
        "threads": args.threads,
        "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": args.prefill_tokens / statistics.median(prefill_times),
        "decode_tokens": args.decode_tokens,
        "decode_tok_s": args.decode_tokens / statistics.median(decode_times),
    }
    if args.skillkv:
        result["skillkv"] = run_skillkv(args)
        result["ratios"] = ratios(result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"llama.cpp prefill {result['prefill_tok_s']:.1f} tok/s "
          f"({args.prefill_tokens} tokens, n_batch {args.batch}, {args.threads} threads)")
    print(f"llama.cpp decode  {result['decode_tok_s']:.1f} tok/s (single stream)")
    if args.skillkv:
        ours = result["skillkv"]
        print(f"skillkv   prefill {ours['prefill_tok_s']:.1f} tok/s")
        for figure in ours["decode"]:
            print(f"skillkv   decode  {figure['aggregate_tok_s']:.1f} tok/s aggregate "
                  f"at {figure['streams']} streams")
        print(f"skillkv   ttft    cold {ours['ttft_cold_ms']:.1f} ms, "
              f"cached {ours['ttft_cached_ms']:.1f} ms")
        for name, (value, target, higher_is_better) in result["ratios"].items():
            met = value >= target if higher_is_better else value <= target
            relation = ">=" if higher_is_better else "<="
            print(f"{name:<40} {value:8.3f}  target {relation} {target:g}  "
                  f"{'met' if met else 'NOT met'}")


def run_skillkv(args):
    """`skillkv bench engine --json` on the same workloads, after llama.cpp has finished."""
    command = [
        args.skillkv, "bench", "engine", "--json",
        "--model", args.model,
        "--prefill-tokens", str(args.prefill_tokens),
        "--chunk", str(args.batch),
        "--decode-prompt", str(args.decode_prompt),
        "--decode-steps", str(args.decode_tokens),
        "--streams", "1,4,8,16",
        "--repeats", str(args.repeats),
    ]
    environment = dict(os.environ, CANDLE_NUM_THREADS=str(args.threads))
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return json.loads(output.stdout.strip().splitlines()[-1])


def ratios(result):
    """(value, target, higher is better) per target of issue 3."""
    ours = result["skillkv"]
    by_streams = {figure["streams"]: figure["aggregate_tok_s"] for figure in ours["decode"]}
    return {
        "prefill vs llama.cpp": (ours["prefill_tok_s"] / result["prefill_tok_s"], 1.0, True),
        "decode 1 stream vs llama.cpp": (by_streams[1] / result["decode_tok_s"], 0.8, True),
        "decode 8 streams vs llama.cpp 1 stream": (
            by_streams[8] / result["decode_tok_s"], 3.0, True),
        "cached / cold ttft (skillkv)": (
            ours["ttft_cached_ms"] / ours["ttft_cold_ms"], 1 / 50, False),
    }


if __name__ == "__main__":
    main()
