#!/usr/bin/env python3
"""The reference's own bf16 run over each model fixture's sequence: `logits_bf16`.

Run from the repository root (about 20 s on one core, no network):

    /work/oracle-env/venv/bin/python tests/oracle/bf16_logits.py             # every fixture below
    /work/oracle-env/venv/bin/python tests/oracle/bf16_logits.py laguna/xs2-like ...

For each fixture folder `tests/fixtures/<family>/<variant>/` this loads the checkpoint with
transformers 5.23.0 exactly as a user would run it in bf16 (`<class>.from_pretrained(dir,
dtype=torch.bfloat16)`, the class named in `reference.json`), runs ONE forward without a cache
over the fixture's prompt + generated ids, and adds the logits, as the bf16 tensor the model
returned, to the folder's `reference.safetensors` under `logits_bf16` (the other tensors of that
file are written back unchanged). `max |logits_bf16 - logits|` is what bf16 itself costs the
reference on that checkpoint; the Rust tests bound llmarch's bf16 run by a small multiple of it.

An f32 checkpoint is rounded to bf16 by `from_pretrained`; a bf16 checkpoint is run as stored.
Tensors that the reference keeps in f32 under `dtype=bfloat16` (DeepSeek V4's `_keep_in_fp32`
modules) stay f32 here too. The FP8/FP4 DeepSeek checkpoint (`deepseek_v4/fp8-fp4`) is left out:
its twin `fp8-fp4-dequantized` holds the same values.

Deterministic: CPU, `torch.set_num_threads(1)`, deterministic algorithms, no randomness at all;
two runs give byte-identical files.
"""

import json
import os
import sys

import safetensors.torch
import torch
import transformers

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures")

FIXTURES = [
    "gemma4/e2b-like",
    "gemma4/e4b-like",
    "gemma4/moe-keqv",
    "gemma4/dense-keqv",
    "gemma4/wrapper-bf16-sharded",
    "laguna/xs2-like",
    "laguna/default-rope",
    "laguna/yarn-llama3",
    "zaya/hybrid",
    "zaya/sliding",
    "deepseek_v4/flash-like",
    "deepseek_v4/transformers-form",
    "deepseek_v4/fp8-fp4-dequantized",
    "deepseek_v4/indexer-drops",
    "deepseek_v4/indexer-ties",
    "qwen3_5/dense",
    "qwen3_5/moe",
    "qwen3_5/wrapper",
]


@torch.no_grad()
def make(fixture):
    d = os.path.join(FIXTURES_ROOT, fixture)
    ref = json.load(open(os.path.join(d, "reference.json")))
    path = os.path.join(d, "reference.safetensors")
    tensors = safetensors.torch.load_file(path)
    seq = ref["prompt_ids"] + ref["generated_ids"]
    cls = getattr(transformers, ref["class"])
    model, info = cls.from_pretrained(d, dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    # A fixture made without some tensors (Laguna's `yarn-llama3` drops the score-correction
    # bias, which the reference then initialises to zero) may miss exactly those.
    dropped = {k.replace("mlp.experts.e_score", "mlp.gate.e_score") for k in ref.get("dropped_tensors", [])}
    if set(problems.get("missing_keys", [])) == dropped:
        problems.pop("missing_keys", None)
    assert not problems, f"{fixture}: {problems}"
    model.eval()
    logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
    assert logits.dtype == torch.bfloat16, logits.dtype
    f32 = tensors["logits"]
    assert logits.shape == f32.shape, (logits.shape, f32.shape)
    tensors["logits_bf16"] = logits.contiguous()
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
    err = float((logits.float() - f32).abs().max())
    agree = float((logits.float().argmax(-1) == f32.argmax(-1)).float().mean())
    print(f"{fixture}: max |logits_bf16 - logits| = {err:.4g}, argmax agreement {agree:.0%}")


def main():
    if transformers.__version__ != "5.23.0":
        raise SystemExit(f"transformers {transformers.__version__}: the reference is 5.23.0")
    only = sys.argv[1:]
    for fixture in FIXTURES:
        if only and fixture not in only:
            continue
        make(fixture)


if __name__ == "__main__":
    main()
