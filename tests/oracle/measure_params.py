#!/usr/bin/env python3
"""Reference parameter counts for the ten preset configs.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/measure_params.py

For every folder of the config directory (default /work/shared/configs, override with
--configs DIR or $LLMARCH_CONFIGS) the text config is loaded with
`AutoConfig.from_pretrained(dir).get_text_config()`, the text causal-LM class is
instantiated on the `meta` device, and its parameters are counted the way
`model.parameters()` yields them (deduplicated, so a tied lm_head counts once).

Writes tests/fixtures/reference_params.json and prints a summary.

    /work/oracle-env/venv/bin/python tests/oracle/measure_params.py --tiny

does the same for every tiny config the tests run or parse: `tests/fixtures/tiny/<name>/` and
the model fixtures `tests/fixtures/<family>/<variant>/`, keyed by that path under
tests/fixtures, into tests/fixtures/reference_params_tiny.json (no README figures to compare).
"""

import argparse
import os
import re
import sys
from collections import OrderedDict

import torch
import transformers
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIGS = os.environ.get("LLMARCH_CONFIGS", "/work/shared/configs")
OUT_PATH = os.path.join(REPO_ROOT, "tests", "fixtures", "reference_params.json")
FIXTURES_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures")
TINY_OUT_PATH = os.path.join(FIXTURES_ROOT, "reference_params_tiny.json")
# Folders under tests/fixtures holding tiny configs (each `<folder>/<name>/config.json`).
TINY_FOLDERS = ["tiny", "gemma4", "laguna", "zaya", "deepseek_v4", "qwen3_5"]

# text model_type -> causal LM class name
CAUSAL_LM = {
    "gemma4_text": "Gemma4ForCausalLM",
    "laguna": "LagunaForCausalLM",
    "zaya": "ZayaForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}

# Figures from /work/shared/configs/README.md ("params measured" column), in billions.
README_TOTAL_B = {
    "gemma-4-E2B-it": 4.629,
    "gemma-4-E4B-it": 7.463,
    "gemma-4-26B-A4B-it": 25.233,
    "gemma-4-31B-it": 30.697,
    "Laguna-XS.2": 33.443,
    "ZAYA1-8B": 8.840,
    "DeepSeek-V4-Flash": 284.332,
    "DeepSeek-V4-Pro": 1572.997,
    "Qwen3.6-27B": 26.896,
    "Qwen3.6-35B-A3B": 34.661,
}
README_ROUTED_B = {
    "gemma-4-26B-A4B-it": 22.838,
    "Laguna-XS.2": 31.407,
    "ZAYA1-8B": 8.053,
    "DeepSeek-V4-Flash": 277.025,
    "DeepSeek-V4-Pro": 1547.396,
    "Qwen3.6-35B-A3B": 32.212,
}
README_PLE_B = {"gemma-4-E2B-it": 2.349, "gemma-4-E4B-it": 2.819}
README_EMBED_B = {"gemma-4-E2B-it": 0.403, "gemma-4-E4B-it": 0.671}

LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def pattern(name):
    return LAYER_RE.sub(lambda m: f"{m.group(1)}layers.*.", name, count=1)


def expert_counts(cfg):
    """(num_experts, top_k) as the config declares them, or (None, None) for dense models."""
    mt = cfg.model_type
    if mt == "gemma4_text":
        if getattr(cfg, "enable_moe_block", False):
            return cfg.num_experts, cfg.top_k_experts
        return None, None
    if mt == "deepseek_v4":
        return cfg.n_routed_experts, cfg.num_experts_per_tok
    if mt in ("laguna", "zaya", "qwen3_5_moe_text"):
        return cfg.num_experts, cfg.num_experts_per_tok
    return None, None


def is_routed_expert_param(name):
    # Routed experts live in a module named `experts` (fused gate_up_proj / down_proj tensors).
    # Shared experts are `shared_expert` / `shared_experts` / `shared_mlp` and routers are `router` / `gate`,
    # so matching the exact path component `experts` excludes both.
    return "experts" in name.split(".")


def measure(folder, path):
    cfg = AutoConfig.from_pretrained(path)
    text_cfg = cfg.get_text_config()
    cls_name = CAUSAL_LM[text_cfg.model_type]
    cls = getattr(transformers, cls_name)
    with torch.device("meta"):
        model = cls(text_cfg)

    named = list(model.named_parameters())  # deduplicated like .parameters()
    total = sum(p.numel() for _, p in named)
    assert total == sum(p.numel() for p in model.parameters())

    embed_w = model.model.embed_tokens.weight
    ple_mod = getattr(model.model, "embed_tokens_per_layer", None)
    ple = ple_mod.weight.numel() if ple_mod is not None else 0
    lm_w = model.lm_head.weight
    tied = lm_w is embed_w
    lm_head = 0 if tied else lm_w.numel()
    lm_b = getattr(model.lm_head, "bias", None)
    lm_head_bias = lm_b.numel() if lm_b is not None else 0

    routed = sum(p.numel() for n, p in named if is_routed_expert_param(n))
    num_experts, top_k = expert_counts(text_cfg)

    breakdown = OrderedDict()
    layer_totals = [0] * len(model.model.layers)
    for n, p in named:
        key = pattern(n)
        breakdown[key] = breakdown.get(key, 0) + p.numel()
        m = LAYER_RE.search(n)
        if m:
            layer_totals[int(m.group(2))] += p.numel()

    # Persistent buffers are saved in checkpoints but are not parameters (e.g. DeepSeek-V4's
    # hash-routing table `tid2eid`). Informational only: NOT included in any count above.
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = OrderedDict()
    for n, t in model.state_dict(keep_vars=True).items():
        if n not in param_names:
            key = pattern(n)
            buffers[key] = buffers.get(key, 0) + t.numel()

    return {
        "repo_class": cls_name,
        "text_config_class": type(text_cfg).__name__,
        "total": total,
        "embedding": embed_w.numel(),
        "ple": ple,
        "lm_head": lm_head,
        "tied_lm_head": tied,
        "lm_head_bias": lm_head_bias,
        "routed_experts": routed,
        "num_experts": num_experts,
        "top_k": top_k,
        "layers": len(model.model.layers),
        "non_layer": total - sum(layer_totals),
        "layer_totals": layer_totals,
        "breakdown": dict(breakdown),
        "persistent_buffers": dict(buffers),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--out", default=OUT_PATH)
    ap.add_argument("--tiny", action="store_true", help="the tiny test configs -> " + TINY_OUT_PATH)
    args = ap.parse_args()

    if args.tiny:
        result = OrderedDict()
        for top in TINY_FOLDERS:
            for name in sorted(os.listdir(os.path.join(FIXTURES_ROOT, top))):
                d = os.path.join(FIXTURES_ROOT, top, name)
                if os.path.isfile(os.path.join(d, "config.json")):
                    r = measure(name, d)
                    del r["breakdown"]  # kept small; the preset file has the breakdowns
                    result[f"{top}/{name}"] = r
        compact_json.dump(result, TINY_OUT_PATH)
        for k, r in result.items():
            print(f"{k:<36} {r['repo_class']:<24} total {r['total']:>9} routed {r['routed_experts']:>8}")
        print(f"{len(result)} tiny configs -> {TINY_OUT_PATH}")
        return

    folders = sorted(
        d for d in os.listdir(args.configs) if os.path.isfile(os.path.join(args.configs, d, "config.json"))
    )
    result = OrderedDict()
    for folder in folders:
        result[folder] = measure(folder, os.path.join(args.configs, folder))
        del result[folder]["lm_head_bias"]  # none of the presets has one

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    compact_json.dump(result, args.out)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    hdr = f"{'folder':<20} {'class':<22} {'total B':>10} {'README':>9} {'routed B':>9} {'README':>9} {'embed B':>8} {'ple B':>7} {'lm_head B':>9}"
    print(hdr)
    bad = []
    for folder, r in result.items():
        t = r["total"] / 1e9
        rt = README_TOTAL_B.get(folder)
        ro = r["routed_experts"] / 1e9
        rro = README_ROUTED_B.get(folder)
        print(
            f"{folder:<20} {r['repo_class']:<22} {t:>10.3f} {rt if rt is not None else '-':>9} "
            f"{ro:>9.3f} {rro if rro is not None else '-':>9} {r['embedding'] / 1e9:>8.3f} "
            f"{r['ple'] / 1e9:>7.3f} {r['lm_head'] / 1e9:>9.3f}"
        )
        for name, got, table in (
            ("total", t, README_TOTAL_B),
            ("routed", ro, README_ROUTED_B),
            ("ple", r["ple"] / 1e9, README_PLE_B),
            ("embedding", r["embedding"] / 1e9, README_EMBED_B),
        ):
            want = table.get(folder)
            if want is not None and round(got, 3) != want:
                bad.append(f"{folder} {name}: measured {got:.3f} B, README {want} B")
    if bad:
        print("MISMATCHES vs README:\n  " + "\n  ".join(bad))
        sys.exit(1)
    print(f"all totals / routed / PLE / embedding figures match the README to 3 decimals -> {args.out}")


if __name__ == "__main__":
    main()
