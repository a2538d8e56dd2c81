#!/usr/bin/env python3
"""Times transformers on a local checkpoint the way bench_transformers.json was measured.

prefill = one forward over the prompt ids with a DynamicCache; decode = NEW single-token forwards
on that cache (greedy argmax), tok/s = NEW / their time; one warm-up run first, then RUNS timed
runs (median). Prints one JSON line. Run with the oracle venv:

    /work/oracle-env/venv/bin/python bench/transformers_bench.py MODEL_DIR --prompt-ids 2,17,... \
        --new-tokens 32 --threads 2 --runs 3
"""

import argparse
import json
import os
import resource
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a local Hugging Face model folder")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()

    import torch  # after argparse, so --help is instant
    import transformers

    torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    prompt = torch.tensor([ids])
    prefill, decode, generated = [], [], []
    with torch.no_grad():
        for r in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            t1 = time.perf_counter()
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [int(nxt)]
            t2 = time.perf_counter()
            for _ in range(args.new_tokens):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(nxt))
            t3 = time.perf_counter()
            if r >= args.warmup:
                prefill.append(len(ids) / (t1 - t0))
                decode.append(args.new_tokens / (t3 - t2))
                generated = toks
    print(
        json.dumps(
            {
                "prefill_tok_s": statistics.median(prefill),
                "decode_tok_s": statistics.median(decode),
                "prefill_tok_s_all": prefill,
                "decode_tok_s_all": decode,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "generated_ids": generated,
                "threads": args.threads,
                "dtype": args.dtype,
                "loadavg": os.getloadavg(),
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__.split("+")[0],
            }
        )
    )


if __name__ == "__main__":
    main()
