#!/usr/bin/env python3
"""Every reference fixture through a CUDA build of llmarch, against the reference and the CPU.

    scripts/cuda_fixtures.py LLMARCH OUT_JSON     (from the repository root, on a GPU machine)

Per fixture (tests/fixtures/<family>/<variant> with reference.json) it runs `llmarch run` greedily
over the reference's prompt for as many tokens as the reference generated, with `--logits-out`, on
`--device cuda` and `--device cpu`, at f32 and bf16, and reports:
  - f32 on CUDA: the reference's greedy ids; the largest logit error against the reference (the
    generic path's bound in tests/run.rs is 5e-3) and against the CPU's f32 logits;
  - bf16 on CUDA: its largest logit error against the f32 reference, over what the reference's own
    bf16 run (`logits_bf16`) differs by on the same rows (tests/common/reference.rs bounds the CPU's
    at 1.5×); whether its ids equal the CPU bf16 run's. Rows after the first generated token that
    differs from the reference's are left out: they are logits over other tokens.
Needs python3 with torch and safetensors (the GPU image has both). Exits 1 when an f32 check fails.
"""

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

FAMILIES = ["gemma4", "laguna", "zaya", "deepseek_v4", "qwen3_5"]


def run(llmarch, fixture, ref, device, dtype, tmp):
    out = Path(tmp) / f"{fixture.parent.name}-{fixture.name}-{device}-{dtype}.safetensors"
    cmd = [llmarch, "run", str(fixture), "--prompt-ids", ",".join(map(str, ref["prompt_ids"])),
           "-n", str(len(ref["generated_ids"])), "--temperature", "0", "--dtype", dtype,
           "--device", device, "--json", "--logits-out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-2000:]}
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    return {"ids": stats["generated_ids"], "kernels": stats.get("kernels"),
            "logits": load_file(str(out))["logits"].float()}


def max_err(a, b, n=None):
    n = min(a.shape[0], b.shape[0], n or a.shape[0])
    return (a[:n] - b[:n]).abs().max().item()


def same_input_rows(ref, ids):
    """Logit rows computed over the reference's own tokens: the prompt's, then one per generated
    token up to the first that differs from the reference's (later rows see other inputs)."""
    k = next((i for i, (a, b) in enumerate(zip(ids, ref["generated_ids"])) if a != b), len(ids))
    return len(ref["prompt_ids"]) + k


def main():
    llmarch, out_json = sys.argv[1], sys.argv[2]
    fixtures = [d for f in FAMILIES for d in sorted(Path("tests/fixtures", f).iterdir())
                if (d / "reference.json").is_file()]
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(4) as pool:
        jobs = {}
        for d in fixtures:
            ref = json.load(open(d / "reference.json"))
            for device in ["cuda", "cpu"]:
                for dtype in ["f32", "bf16"]:
                    jobs[(d, device, dtype)] = pool.submit(run, llmarch, d, ref, device, dtype, tmp)
        for d in fixtures:
            ref = json.load(open(d / "reference.json"))
            r = load_file(str(d / "reference.safetensors"))
            want = r["logits"].float()
            res = {k: jobs[(d, *k)].result() for k in
                   [("cuda", "f32"), ("cpu", "f32"), ("cuda", "bf16"), ("cpu", "bf16")]}
            row = {"fixture": f"{d.parent.name}/{d.name}"}
            errors = {f"{k[0]} {k[1]}": v["error"] for k, v in res.items() if "error" in v}
            if errors:
                row["errors"] = errors
                failed += 1
                rows.append(row)
                print(row["fixture"], "ERROR", json.dumps(errors)[:3000], flush=True)
                continue
            g32, c32, g16, c16 = (res[k] for k in
                                  [("cuda", "f32"), ("cpu", "f32"), ("cuda", "bf16"), ("cpu", "bf16")])
            row.update({
                "kernels": g32["kernels"],
                "f32_ids_equal_reference": g32["ids"] == ref["generated_ids"],
                "f32_err_reference": max_err(g32["logits"], want),
                "f32_err_cpu": max_err(g32["logits"], c32["logits"]),
                "bf16_err_reference": max_err(g16["logits"], want, same_input_rows(ref, g16["ids"])),
                "bf16_cpu_err_reference": max_err(c16["logits"], want, same_input_rows(ref, c16["ids"])),
                "bf16_ids_equal_cpu_bf16": g16["ids"] == c16["ids"],
                "bf16_ids_equal_reference": g16["ids"] == ref["generated_ids"],
            })
            if "logits_bf16" in r:
                own = max_err(r["logits_bf16"].float(), want, same_input_rows(ref, g16["ids"]))
                row["reference_bf16_err"] = own
                row["bf16_factor"] = row["bf16_err_reference"] / own
            ok = (row["f32_ids_equal_reference"] and row["f32_err_reference"] < 5e-3
                  and row["kernels"] == "cuda")
            failed += not ok
            rows.append(row)
            print(("ok  " if ok else "FAIL"), json.dumps(row), flush=True)
    json.dump(rows, open(out_json, "w"), indent=1)
    print(f"{len(rows) - failed}/{len(rows)} fixtures pass the f32 checks on CUDA")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
