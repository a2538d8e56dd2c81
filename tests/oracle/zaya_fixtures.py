#!/usr/bin/env python3
"""Tiny random ZAYA checkpoints and the reference outputs.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/zaya_fixtures.py      # -> tests/fixtures/zaya/

For every variant in VARIANTS this script
  1. builds the variant's `ZayaConfig` and `ZayaForCausalLM`, randomises EVERY saved tensor
     (parameters and the router's persistent `balancing_biases` buffer): multiplicative ones
     (ZayaRMSNorm weights, the residual-scaling and input scales, the router's EDA
     `router_states_scale`) as 1 + N(0, 0.2), the QK-norm key temperature `temp` as
     4·(1 + N(0, 0.2)), the residual-scaling and input biases as N(0, 0.02), the router's
     balancing biases as N(0, 0.02) (the expert entries of layer 1 shifted by -1), everything else
     (linear biases, conv kernels, router biases, ...) as N(0, 0.2); writes a complete model folder with
     `save_pretrained` (+ the tokenizer files of tests/fixtures/gemma4/e2b-like, vocab 512, and a
     generation_config.json),
     the skip-class entry of each router's `balancing_biases` is random in the file but -1 in the
     reference (see force_skip_bias below),
  2. reloads that folder with `from_pretrained` in float32 (so the reference is what the files say),
  3. runs greedy `generate(use_cache=True)` from the fixed prompt for 20 tokens (window 8), then ONE
     full forward without a cache over the final sequence, and records the logits, the generated
     ids, the reference's cache bytes and a few cross-checks,
  4. writes `reference.safetensors` + `reference.json` into the variant folder.
A variant's weight seed is the first seed >= its base seed whose greedy continuation has no EOS, is
varied, has a top-1/top-2 logit margin >= MIN_MARGIN at every greedy decision, whose router picks
are unambiguous (at every token of the full forward, the top-1 and top-2 biased router scores
differ by >= MIN_ROUTER_GAP), and whose routing uses the skip class (no expert) for some tokens and
real experts for others.

Deterministic: fixed seeds, CPU, torch.set_num_threads(1); two runs give identical files.
"""

import argparse
import json
import os
import shutil
import sys
from collections import OrderedDict

import safetensors.torch
import torch
import transformers
from transformers import ZayaConfig, ZayaForCausalLM
from transformers.models.zaya.modeling_zaya import ZayaRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402
import gemma4_fixtures as g4  # noqa: E402  (pinned versions, tokenizer ids, generation helpers)
from measure_cache import describe_cache  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures", "zaya")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4", "e2b-like")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

H, S = "hybrid", "hybrid_sliding"
MIN_ROUTER_GAP = 1e-3
MAX_SEED_TRIES = 300


def zaya_config(**overrides):
    kw = dict(
        vocab_size=g4.VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        router_hidden_size=16,
        max_position_embeddings=256,
        bos_token_id=g4.BOS_ID,
        eos_token_id=g4.EOS_IDS,
        pad_token_id=g4.PAD_ID,
    )
    kw.update(overrides)
    return ZayaConfig(**kw)


def cfg_hybrid():
    # ZAYA1-8B in miniature: every layer `hybrid` (full attention), the default RoPE blocks
    # (absent from config.json), conv kernels 2 + 2, tied embeddings, no biases.
    return zaya_config(layer_types=[H] * 4, tie_word_embeddings=True)


def cfg_sliding():
    # Sliding and full layers with their own RoPE, longer conv kernels (3 + 2: three carried
    # rows), attention biases, an untied head with a bias.
    rope = {
        H: {"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5},
        S: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25},
    }
    return zaya_config(
        layer_types=[S, H, S, S],
        sliding_window=8,
        rope_parameters=rope,
        cca_time0=3,
        cca_time1=2,
        attention_bias=True,
        tie_word_embeddings=False,
        lm_head_bias=True,
    )


VARIANTS = OrderedDict(
    [
        (
            "hybrid",
            dict(
                config=cfg_hybrid,
                dtype="float32",
                seed=500,
                strip_rope=True,
                covers="all layers `hybrid` (full causal attention), no rope_parameters in config.json (reference "
                "defaults: theta 5e6 over half of each 16-dim head), CCA conv 2 + 2 (2 carried rows), 4 query heads "
                "over 2 KV heads, top-1 of 4 experts + the skip class, EDA router state from layer 1, tied "
                "embeddings, no biases, f32 files",
            ),
        ),
        (
            "sliding",
            dict(
                config=cfg_sliding,
                dtype="bfloat16",
                seed=600,
                strip_rope=False,
                covers="layers S H S S with sliding_window 8 (`hybrid_sliding`: theta 1e4 over a quarter of each head; "
                "`hybrid`: theta 1e6 over half), CCA conv 3 + 2 (3 carried rows), attention biases, untied head with "
                "lm_head_bias, top-1 of 4 experts + the skip class, bf16 files",
            ),
        ),
    ]
)


# --------------------------------------------------------------------------------------
# Randomisation, router margins
# --------------------------------------------------------------------------------------

MULT_SUFFIXES = (
    "hidden_states_scale",
    "residual_scale",
    "input_hidden_states_scale",
    "router_states_scale",
    "qk_norm.temp",
)


# The key temperature sharpens attention over L2-normalised q/k (scores are head_dim·cos·temp /
# sqrt(head_dim)); around 1 the tiny models attend almost uniformly and repeat one token.
TEMP_SUFFIX = "qk_norm.temp"
TEMP_CENTRE = 4.0
# The residual-scaling biases are added to the residual stream at every layer; at the full weight
# scale they drown the token signal and the tiny models repeat one token.
RESIDUAL_BIAS_SUFFIX = ("hidden_states_bias", "residual_bias")
RESIDUAL_BIAS_STD = 0.02
# The router's balancing biases are added to softmax probabilities; at the full weight scale they
# alone decide the expert. And the reference always routes with a skip-class bias of -1 (see
# force_skip_bias), so the skip class would never win: on layer SKIP_LAYER the expert biases are
# shifted by -1 too, so there the skip class competes evenly with the experts.
BALANCING_STD = 0.02
SKIP_LAYER = 1


def multiplicative_names(model):
    names = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "ZayaRMSNorm"}
    names |= {n for n in model.state_dict() if n.endswith(MULT_SUFFIXES)}
    return names


@torch.no_grad()
def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    mult = multiplicative_names(model)
    sd = model.state_dict()
    seen = set()
    counts = {"scale": 0, "weight": 0}
    for name in sorted(sd):
        t = sd[name]
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied lm_head -> embed_tokens
            continue
        seen.add(ptr)
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith(TEMP_SUFFIX):
            t.copy_((TEMP_CENTRE * (1.0 + g4.SCALE_STD * noise)).to(t.dtype))
            counts["scale"] += 1
        elif name in mult:
            t.copy_((1.0 + g4.SCALE_STD * noise).to(t.dtype))
            counts["scale"] += 1
        elif name.endswith("balancing_biases"):
            val = BALANCING_STD * noise
            if name.startswith(f"model.layers.{SKIP_LAYER}."):
                val[:-1] -= 1.0
            t.copy_(val.to(t.dtype))
            counts["weight"] += 1
        elif name.endswith(RESIDUAL_BIAS_SUFFIX):
            t.copy_((RESIDUAL_BIAS_STD * noise).to(t.dtype))
            counts["weight"] += 1
        else:
            t.copy_((g4.WEIGHT_STD * noise).to(t.dtype))
            counts["weight"] += 1
    for name, t in model.state_dict().items():
        assert t.float().flatten().std() > 0, f"{name} is constant"
    return counts


@torch.no_grad()
def router_stats(model, seq):
    """Smallest top-1/top-2 gap of the biased router scores over all tokens and layers, and how many
    (token, layer) picks went to the skip class and to real experts."""
    gaps, skips, real = [], 0, 0

    def hook(mod, args, out):
        logits = out[0]  # [tokens, E + 1]
        scores = torch.softmax(logits.float(), dim=-1) + mod.balancing_biases.float()
        top = torch.topk(scores, 2, dim=-1)
        gaps.append(float((top.values[:, 0] - top.values[:, 1]).min()))
        nonlocal skips, real
        s = int((top.indices[:, 0] == mod.num_experts).sum())
        skips += s
        real += top.indices.shape[0] - s

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ZayaRouter)]
    try:
        model(input_ids=seq[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return min(gaps), skips, real


def acceptable(run, stats):
    gap, skips, real = stats
    gen = run["generated"]
    return (
        run["finite"]
        and len(gen) == g4.MAX_NEW_TOKENS
        and not (set(gen) & set(g4.EOS_IDS))
        and not run["mismatch"]
        and run["min_margin"] >= g4.MIN_MARGIN
        and len(set(gen)) >= g4.MIN_DISTINCT
        and g4.longest_run(gen) <= g4.MAX_RUN
        and gap >= MIN_ROUTER_GAP
        and skips > 0
        and real > 0
    )


# --------------------------------------------------------------------------------------
# The skip-class balancing bias
# --------------------------------------------------------------------------------------
# `from_pretrained` loads `balancing_biases` from the file and then `ZayaPreTrainedModel._init_weights`
# runs `module.balancing_biases[-1] = -1.0` unconditionally (the zeros_ before it is skipped for
# loaded tensors, this plain write is not): whatever the checkpoint says, the reference routes with a
# skip-class bias of -1. The files keep a random skip-class bias (so a reader that trusts the file
# would differ from the reference); the probe model runs with -1, as the reloaded reference does.


@torch.no_grad()
def force_skip_bias(model):
    """Set every router's skip-class bias to -1 (what the reloaded reference uses); return the random
    values, by state-dict name, to write into the file."""
    out = OrderedDict()
    for n, m in model.named_modules():
        if isinstance(m, ZayaRouter):
            out[f"{n}.balancing_biases"] = float(m.balancing_biases[-1])
            m.balancing_biases[-1] = -1.0
    return out


def write_skip_bias(d, values):
    path = os.path.join(d, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    for k, v in values.items():
        t = tensors[k].clone()
        t[-1] = v
        tensors[k] = t
    safetensors.torch.save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


def make_variant(name, spec, prompt_ids, quiet=False):
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        torch.manual_seed(seed)
        model = ZayaForCausalLM(spec["config"]()).eval()
        counts = randomize(model, seed)
        file_skip_bias = force_skip_bias(model)
        probe = model.to(torch.bfloat16).float() if spec["dtype"] == "bfloat16" else model
        run = g4.reference_run(probe, prompt_ids, g4.MAX_NEW_TOKENS)
        if acceptable(run, router_stats(probe, run["sequence"])):
            break
    else:
        raise SystemExit(f"{name}: no seed in {MAX_SEED_TRIES} tries gives an acceptable greedy run")

    d = os.path.join(OUT_ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    in_memory = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(d)
    write_skip_bias(d, file_skip_bias)
    if spec.get("strip_rope"):
        # save_pretrained writes the defaults out; remove them so the file tests the absent form.
        path = os.path.join(d, "config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        del cfg["rope_parameters"]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(d, f))
    with open(os.path.join(d, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(g4.generation_config(), f, indent=2)
        f.write("\n")

    # The reference is the reloaded folder, run in float32.
    ref, problems = g4.load(d, "ZayaForCausalLM", torch.float32)
    assert not problems, f"{name}: loading info {problems}"
    diff = g4.state_dicts_equal(in_memory, ref.state_dict())
    assert not diff, f"{name}: {diff[:5]}"
    run = g4.reference_run(ref, prompt_ids, g4.MAX_NEW_TOKENS)
    stats = router_stats(ref, run["sequence"])
    assert acceptable(run, stats), f"{name}: reloaded model differs from the probe"
    gap, skips, real = stats

    eager, _ = g4.load(d, "ZayaForCausalLM", torch.float32)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        eager_logits = eager(input_ids=run["sequence"][None], use_cache=False).logits[0].float()
    eager_diff = float((eager_logits - run["logits"]).abs().max())

    layers, total, _ = describe_cache(run["cache"], ref.config)
    cache_tokens = len(run["sequence"]) - 1
    tensors = OrderedDict(
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        generated_ids=torch.tensor(run["generated"], dtype=torch.int64),
        logits=run["logits"].contiguous(),
        cache_layer_bytes=torch.tensor([L["bytes"] for L in layers], dtype=torch.int64),
    )
    safetensors.torch.save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    window = ref.config.sliding_window
    notes = [
        spec["covers"] + ".",
        f"Weights: seed {seed}; {counts['scale']} multiplicative tensors (ZayaRMSNorm weights, residual/input "
        f"scales, router_states_scale) = 1 + N(0, {g4.SCALE_STD}), qk_norm.temp = {TEMP_CENTRE} * (1 + "
        f"N(0, {g4.SCALE_STD})); {counts['weight']} others: residual/input biases = N(0, {RESIDUAL_BIAS_STD}), "
        f"router balancing_biases = N(0, {BALANCING_STD}) (layer {SKIP_LAYER}: expert entries - 1), "
        f"the rest = N(0, {g4.WEIGHT_STD}).",
        f"logits: ONE forward with use_cache=False over prompt + generated ({len(run['sequence'])} positions), "
        f"float32 (files are {spec['dtype']}, upcast on load); row i predicts token i + 1.",
        f"Greedy generate(use_cache=True) tokens equal the argmax of the full-forward logits at every position: "
        f"{not run['mismatch']}. Max |cached step logits - full-forward logits| = {run['step_max_abs_diff']:.3g}. "
        f"Min top-1/top-2 margin at the greedy decisions: {run['min_margin']:.4f}. Min router top-1/top-2 gap: "
        f"{gap:.4f}; (token, layer) picks of the skip class: {skips}, of a real expert: {real}.",
        f"Max |eager - sdpa| full-forward logits: {eager_diff:.3g}.",
        f"Cache after generate holds {cache_tokens} tokens (the last generated token is not fed): {total} B in "
        f"K/V, conv and recurrent tensors, f32"
        + (f"; the reference's sliding layers keep sliding_window - 1 = {window - 1} tokens." if window else "."),
    ]
    doc = OrderedDict(
        generator="tests/oracle/zaya_fixtures.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        variant=name,
        **{"class": "ZayaForCausalLM"},
        dtype=spec["dtype"],
        reference_dtype="float32",
        seed=seed,
        prompt_text=g4.TINY_PROMPT_TEXT,
        prompt_ids=prompt_ids,
        generated_ids=run["generated"],
        eos_ids=g4.EOS_IDS,
        max_new_tokens=g4.MAX_NEW_TOKENS,
        sliding_window=window,
        cached_equals_full_argmax=not run["mismatch"],
        min_top2_margin=round(run["min_margin"], 6),
        min_router_gap=round(gap, 6),
        skip_class_picks=skips,
        expert_picks=real,
        cached_vs_full_max_abs_diff=float(f"{run['step_max_abs_diff']:.3g}"),
        eager_vs_sdpa_max_abs_diff=float(f"{eager_diff:.3g}"),
        cache=OrderedDict(
            tokens=cache_tokens,
            total_bytes=total,
            layers=[
                OrderedDict(
                    layer=L["decoder_layer"],
                    type=L["decoder_layer_type"],
                    cache_class=L["layer_class"],
                    bytes=L["bytes"],
                    shapes={t["name"]: t["shape"] for t in L["tensors"] if not t.get("bookkeeping")},
                )
                for L in layers
            ],
        ),
        notes=notes,
    )
    compact_json.dump(doc, os.path.join(d, "reference.json"))
    if not quiet:
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(
            f"{name:<10} seed {seed} T={len(run['sequence'])} gen={run['generated']} margin={run['min_margin']:.3f} "
            f"router gap={gap:.4f} skips={skips}/{skips + real} cache={total} B files={size} B "
            f"step-full={run['step_max_abs_diff']:.2g} eager-sdpa={eager_diff:.2g}"
        )
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="subset of variant names")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    g4.check_versions()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    prompt_ids = tok.encode(g4.TINY_PROMPT_TEXT, add_special_tokens=True).ids
    os.makedirs(OUT_ROOT, exist_ok=True)
    for name in args.only or list(VARIANTS):
        make_variant(name, VARIANTS[name], prompt_ids, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
