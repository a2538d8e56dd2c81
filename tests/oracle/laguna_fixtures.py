#!/usr/bin/env python3
"""Tiny random Laguna checkpoints and the reference outputs; reference RoPE frequency tables.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/laguna_fixtures.py      # -> tests/fixtures/laguna/

For every variant in VARIANTS this script
  1. builds the variant's `LagunaConfig` and `LagunaForCausalLM`, randomises EVERY saved
     parameter (LagunaRMSNorm weights as 1 + N(0, 0.2), everything else, the router's
     `e_score_correction_bias` included, N(0, 0.2)), and writes a complete model folder with
     `save_pretrained` (+ the tokenizer files of tests/fixtures/gemma4/e2b-like, vocab 512, and
     a generation_config.json); a variant may drop the score-correction bias from the file (the
     reference then routes with zeros) or `rope_parameters` from config.json (the reference then
     uses its defaults). `save_pretrained` writes the Hub layout through transformers' conversion
     mapping: one MLP per expert (`mlp.experts.{e}.gate_proj.weight`, ...), the bias as
     `mlp.experts.e_score_correction_bias`, the shared expert as `mlp.shared_expert.*`,
  2. reloads that folder with `from_pretrained` in float32 (so the reference is what the files say),
  3. runs greedy `generate(use_cache=True)` from the fixed prompt for 20 tokens (window 8), then ONE
     full forward without a cache over the final sequence, and records the logits, the generated
     ids, the reference's KV-cache bytes and a few cross-checks,
  4. writes `reference.safetensors` + `reference.json` into the variant folder.
A variant's weight seed is the first seed >= its base seed whose greedy continuation has no EOS, is
varied, has a top-1/top-2 logit margin >= MIN_MARGIN at every greedy decision, and whose router
picks are unambiguous: at every routed token of the full forward, the k-th and (k+1)-th selection
scores (sigmoid + bias) differ by >= MIN_ROUTER_GAP (so f32 rounding cannot swap an expert).

--bench DIR: writes a ~0.5 B-parameter random checkpoint in Laguna-XS.2's shape (f32, vocab
32768: the fixtures' tokenizer padded with unused tokens, as gemma4_fixtures.py --bench does), then
times transformers on it into DIR/bench_transformers.json (see bench/README.md):

    /work/oracle-env/venv/bin/python tests/oracle/laguna_fixtures.py --bench /work/bench-laguna

It also writes tests/fixtures/laguna/rope_reference.json: for a list of RoPE configurations (every
`rope_type` and form the Laguna config accepts), the `inv_freq` and `attention_scaling` that the
reference's `LagunaRotaryEmbedding` computes per layer type.

Deterministic: fixed seeds, CPU, torch.set_num_threads(1); two runs give identical files.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import OrderedDict

import safetensors
import safetensors.torch
import torch
import transformers
from transformers import LagunaConfig, LagunaForCausalLM
from transformers.models.laguna.modeling_laguna import LagunaRotaryEmbedding, LagunaTopKRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402
import gemma4_fixtures as g4  # noqa: E402  (pinned versions, tokenizer ids, generation helpers)
from measure_cache import describe_cache  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures", "laguna")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4", "e2b-like")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

S, F = "sliding_attention", "full_attention"
MIN_ROUTER_GAP = 1e-3
MAX_SEED_TRIES = 300

# XS.2's RoPE blocks, verbatim from poolside/Laguna-XS.2's config.json.
XS2_ROPE = {
    F: {
        "attention_factor": 1.0,
        "beta_fast": 64.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.5,
        "rope_theta": 500000.0,
        "rope_type": "yarn",
    },
    S: {"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"},
}


def laguna_config(**overrides):
    kw = dict(
        vocab_size=g4.VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=[F, S, S, F],
        num_attention_heads_per_layer=[4, 6, 6, 4],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        sliding_window=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        max_position_embeddings=256,
        bos_token_id=g4.BOS_ID,
        eos_token_id=g4.EOS_IDS,
        pad_token_id=g4.PAD_ID,
    )
    kw.update(overrides)
    return LagunaConfig(**kw)


def cfg_xs2_like():
    # XS.2 in miniature: its RoPE blocks verbatim (YaRN x32, beta 64/1, attention factor 1, half of
    # each head rotated on full layers; default over the whole head on sliding ones), per-head gate
    # as the string, 4 query heads on full and 6 on sliding layers over 2 KV heads, routed x2.5.
    return laguna_config(
        rope_parameters=json.loads(json.dumps(XS2_ROPE)),
        max_position_embeddings=131072,
        gating="per-head",
        moe_routed_scaling_factor=2.5,
        tie_word_embeddings=False,
    )


def cfg_default_rope():
    # No rope_parameters: the reference's defaults (full: default theta 5e5 over half the head;
    # sliding: default theta 1e4). Per-element gate, router logit soft-cap 2, routing scale 1,
    # tied embeddings, sliding layer first.
    return laguna_config(
        layer_types=[S, F, S, S],
        num_attention_heads_per_layer=[6, 4, 6, 6],
        gating="per-element",
        moe_router_logit_softcapping=2.0,
        tie_word_embeddings=True,
    )


def cfg_yarn_llama3():
    # Nested RoPE with computed attention factor: full = YaRN x8 over half the head (no
    # attention_factor, so 0.1 ln 8 + 1; default betas) with `truncate: false` at the TOP level of
    # rope_parameters (where the reference reads it; a block-level one is ignored); sliding =
    # llama3 (factor 8, low 1, high 4, original 64). gating: true, attention biases, routed x0.75,
    # soft-cap 5, a dense layer between the sparse ones, no score-correction bias in the file.
    rope = {
        F: {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        S: {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
        "truncate": False,
    }
    return laguna_config(
        layer_types=[F, S, S, S],
        num_attention_heads_per_layer=[4, 6, 6, 6],
        mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        rope_parameters=rope,
        gating=True,
        attention_bias=True,
        moe_routed_scaling_factor=0.75,
        moe_router_logit_softcapping=5.0,
        tie_word_embeddings=False,
    )


VARIANTS = OrderedDict(
    [
        (
            "xs2-like",
            dict(
                config=cfg_xs2_like,
                dtype="float32",
                seed=100,
                drop_bias=False,
                covers="XS.2's RoPE blocks verbatim (full: YaRN x32 beta 64/1 attention factor 1 over the leading 8 "
                "of 16 dims; sliding: default over 16), gating 'per-head', query heads [4, 6, 6, 4] over 2 KV heads, "
                "layers F S S F, dense layer 0 then sigmoid MoE (4 experts, top-2) + shared expert, routed x2.5, "
                "score-correction bias, untied head, f32 files",
            ),
        ),
        (
            "default-rope",
            dict(
                config=cfg_default_rope,
                dtype="bfloat16",
                seed=200,
                drop_bias=False,
                strip_rope=True,
                covers="no rope_parameters in config.json (reference defaults: full default theta 5e5 partial 0.5, sliding default "
                "theta 1e4), gating 'per-element', router logit soft-cap 2, routed x1, query heads [6, 4, 6, 6], "
                "layers S F S S, tied embeddings, bf16 files",
            ),
        ),
        (
            "yarn-llama3",
            dict(
                config=cfg_yarn_llama3,
                dtype="bfloat16",
                seed=300,
                drop_bias=True,
                covers="full: YaRN x8 with computed attention factor (0.1 ln 8 + 1), default betas, top-level "
                "rope_parameters.truncate = false; sliding: llama3 RoPE; gating true; attention biases; MLP "
                "dense/sparse/dense/sparse; routed x0.75; router soft-cap 5; NO e_score_correction_bias in the "
                "file (routes with zeros); untied head; bf16 files",
            ),
        ),
    ]
)


# --------------------------------------------------------------------------------------
# Randomisation, router margins
# --------------------------------------------------------------------------------------


def multiplicative_names(model):
    return {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "LagunaRMSNorm"}


@torch.no_grad()
def randomize(model, seed, weight_std=g4.WEIGHT_STD, scale_std=g4.SCALE_STD):
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
        if name in mult:
            t.copy_((1.0 + scale_std * noise).to(t.dtype))
            counts["scale"] += 1
        else:
            t.copy_((weight_std * noise).to(t.dtype))
            counts["weight"] += 1
    for name, t in model.state_dict().items():
        assert t.float().flatten().std() > 0, f"{name} is constant"
    return counts


@torch.no_grad()
def router_gap(model, seq):
    """Smallest gap between the k-th and (k+1)-th selection score over all routed tokens."""
    gaps = []

    def hook(mod, args, out):
        logits = out[0]  # router_logits, soft-capped, f32
        scores = torch.sigmoid(logits) + mod.e_score_correction_bias.float()
        top = torch.topk(scores, mod.top_k + 1, dim=-1).values
        gaps.append(float((top[:, mod.top_k - 1] - top[:, mod.top_k]).min()))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LagunaTopKRouter)]
    try:
        model(input_ids=seq[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return min(gaps)


def acceptable(run, gap):
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
    )


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


def drop_bias(d):
    path = os.path.join(d, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    dropped = sorted(k for k in tensors if k.endswith("e_score_correction_bias"))
    for k in dropped:
        del tensors[k]
    safetensors.torch.save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})
    return dropped


def make_variant(name, spec, prompt_ids, quiet=False):
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        torch.manual_seed(seed)
        model = LagunaForCausalLM(spec["config"]()).eval()
        counts = randomize(model, seed)
        if spec["drop_bias"]:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, LagunaTopKRouter):
                        m.e_score_correction_bias.zero_()
        probe = model.to(torch.bfloat16).float() if spec["dtype"] == "bfloat16" else model
        run = g4.reference_run(probe, prompt_ids, g4.MAX_NEW_TOKENS)
        if acceptable(run, router_gap(probe, run["sequence"])):
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
    dropped = drop_bias(d) if spec["drop_bias"] else []
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
    ref, problems = g4.load(d, "LagunaForCausalLM", torch.float32)
    missing = set(problems.pop("missing_keys", []) or [])
    # The file keeps the bias under the experts; the module under the router.
    want_missing = {k.replace("mlp.experts.e_score", "mlp.gate.e_score") for k in dropped}
    assert missing == want_missing, f"{name}: missing {missing} vs dropped {dropped}"
    assert not problems, f"{name}: loading info {problems}"
    diff = g4.state_dicts_equal(in_memory, ref.state_dict())
    assert not diff, f"{name}: {diff[:5]}"
    run = g4.reference_run(ref, prompt_ids, g4.MAX_NEW_TOKENS)
    gap = router_gap(ref, run["sequence"])
    assert acceptable(run, gap), f"{name}: reloaded model differs from the probe"

    eager, _ = g4.load(d, "LagunaForCausalLM", torch.float32)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        eager_logits = eager(input_ids=run["sequence"][None], use_cache=False).logits[0].float()
    eager_diff = float((eager_logits - run["logits"]).abs().max())

    layers, total, total_storage = describe_cache(run["cache"], ref.config)
    cache_tokens = len(run["sequence"]) - 1
    tensors = OrderedDict(
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        generated_ids=torch.tensor(run["generated"], dtype=torch.int64),
        logits=run["logits"].contiguous(),
        cache_layer_bytes=torch.tensor([L["bytes"] for L in layers], dtype=torch.int64),
    )
    safetensors.torch.save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    rot = ref.model.rotary_emb
    rope = OrderedDict(
        (t, OrderedDict(inv_freq=getattr(rot, f"{t}_inv_freq").tolist(), attention_scaling=getattr(rot, f"{t}_attention_scaling")))
        for t in rot.layer_types
    )
    notes = [
        spec["covers"] + ".",
        f"Weights: seed {seed}; {counts['scale']} LagunaRMSNorm weights = 1 + N(0, {g4.SCALE_STD}); "
        f"{counts['weight']} others (router e_score_correction_bias included) = N(0, {g4.WEIGHT_STD})"
        + (f"; then {len(dropped)} e_score_correction_bias tensors removed from the file" if dropped else "")
        + ".",
        f"logits: ONE forward with use_cache=False over prompt + generated ({len(run['sequence'])} positions), "
        f"float32 (files are {spec['dtype']}, upcast on load); row i predicts token i + 1.",
        f"Greedy generate(use_cache=True) tokens equal the argmax of the full-forward logits at every position: "
        f"{not run['mismatch']}. Max |cached step logits - full-forward logits| = {run['step_max_abs_diff']:.3g}. "
        f"Min top-1/top-2 margin at the greedy decisions: {run['min_margin']:.4f}. Min router top-k gap: {gap:.4f}.",
        f"Max |eager - sdpa| full-forward logits: {eager_diff:.3g}.",
        f"KV cache after generate holds {cache_tokens} tokens (the last generated token is not fed): {total} B "
        f"in K/V tensors, f32; the reference's sliding layers keep sliding_window - 1 = "
        f"{ref.config.sliding_window - 1} tokens.",
    ]
    doc = OrderedDict(
        generator="tests/oracle/laguna_fixtures.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        variant=name,
        **{"class": "LagunaForCausalLM"},
        dtype=spec["dtype"],
        reference_dtype="float32",
        seed=seed,
        prompt_text=g4.TINY_PROMPT_TEXT,
        prompt_ids=prompt_ids,
        generated_ids=run["generated"],
        eos_ids=g4.EOS_IDS,
        max_new_tokens=g4.MAX_NEW_TOKENS,
        sliding_window=ref.config.sliding_window,
        cached_equals_full_argmax=not run["mismatch"],
        min_top2_margin=round(run["min_margin"], 6),
        min_router_gap=round(gap, 6),
        cached_vs_full_max_abs_diff=float(f"{run['step_max_abs_diff']:.3g}"),
        eager_vs_sdpa_max_abs_diff=float(f"{eager_diff:.3g}"),
        dropped_tensors=dropped,
        rope=rope,
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
            f"{name:<14} seed {seed} T={len(run['sequence'])} gen={run['generated']} margin={run['min_margin']:.3f} "
            f"router gap={gap:.4f} cache={total} B files={size} B eager-sdpa={eager_diff:.2g}"
        )
    return doc


# --------------------------------------------------------------------------------------
# RoPE tables
# --------------------------------------------------------------------------------------


def rope_cases():
    yarn16 = {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }
    dflt = {"rope_type": "default", "rope_theta": 10000.0}
    both = [F, S]

    def case(name, rope, head_dim=16, max_pos=256, types=both):
        kw = dict(head_dim=head_dim, max_position_embeddings=max_pos, layer_types=types)
        n = len(types)
        kw.update(num_hidden_layers=n, num_attention_heads_per_layer=[4] * n, mlp_layer_types=["dense"] * n)
        if rope is not None:
            kw["rope_parameters"] = json.loads(json.dumps(rope))
        return name, kw

    return [
        case("xs2", XS2_ROPE, head_dim=128, max_pos=131072),
        case("defaults", None, head_dim=128),
        case("yarn-computed-factor", {F: yarn16, S: dflt}),
        case("yarn-top-level-truncate-false", {F: yarn16, S: dflt, "truncate": False}),
        case("yarn-block-truncate-false-ignored", {F: {**yarn16, "truncate": False}, S: dflt}),
        case("yarn-mscale", {F: {**yarn16, "mscale": 2.0, "mscale_all_dim": 1.0, "beta_fast": 16.0}, S: dflt}),
        case("yarn-whole-head-partial-0.75", {F: {**yarn16, "partial_rotary_factor": 0.75}, S: dflt}),
        case("linear-and-llama3", {
            F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
            S: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0},
        }),
        case("dynamic", {F: {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, S: dflt}),
        case("longrope", {
            F: {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 5.0],
                "original_max_position_embeddings": 64},
            S: dflt,
        }),
        case("proportional", {F: {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}, S: dflt}),
        case("odd-partial", {F: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, S: dflt},
             head_dim=18),
        case("all-full", {F: yarn16}, types=[F, F]),
    ]


def make_rope_reference():
    out = []
    for name, kw in rope_cases():
        cfg = laguna_config(**kw)
        rot = LagunaRotaryEmbedding(cfg)
        per_type = OrderedDict()
        for t in rot.layer_types:
            per_type[t] = OrderedDict(
                inv_freq=getattr(rot, f"{t}_inv_freq").tolist(),
                attention_scaling=float(getattr(rot, f"{t}_attention_scaling")),
            )
        config = json.loads(cfg.to_json_string())
        if "rope_parameters" not in kw:
            del config["rope_parameters"]  # the absent form (the reference fills in its defaults)
        out.append(OrderedDict(name=name, config=config, **per_type))
    path = os.path.join(OUT_ROOT, "rope_reference.json")
    compact_json.dump(
        OrderedDict(
            generator="tests/oracle/laguna_fixtures.py",
            transformers_version=transformers.__version__,
            what="per case: the config (as LagunaConfig.to_json_string writes it) and, per layer type, the "
            "inv_freq and attention_scaling of LagunaRotaryEmbedding (cos/sin = [cos, sin](pos * inv_freq) * "
            "attention_scaling over the leading 2 * len(inv_freq) dims of each head)",
            cases=out,
        ),
        path,
    )
    print(f"rope_reference.json: {len(out)} cases")


# --------------------------------------------------------------------------------------
# Bench checkpoint
# --------------------------------------------------------------------------------------

BENCH_SEED = 7
BENCH_WEIGHT_STD = 0.02  # small weights keep the activations ordinary; norm scales 1 + N(0, 0.2)


def cfg_bench():
    # XS.2 (hidden 2048, 40 layers F S S S, 48 / 64 query heads x 128 over 8 KV heads, dense
    # 8192-wide layer 0, then 256 experts x 512 top-8 + a 512-wide shared expert) scaled to ~0.5 B:
    # hidden 1024; 8 layers F S S S F S S S; head_dim 128 with 24 / 32 query heads over 4 KV heads
    # (the same 6:1 / 8:1 grouping and 3x / 4x hidden query widths); dense layer 0 4096 wide (4x
    # hidden, as 8192 / 2048); 7 sparse layers of 64 experts x 256 (hidden / 4, as 512 / 2048),
    # top-8, + a 256-wide shared expert. XS.2's RoPE blocks, per-head gate, routed x2.5, no
    # soft-cap, untied head, window 512 verbatim; vocab 32768.
    layer_types = [F if i % 4 == 0 else S for i in range(8)]
    return laguna_config(
        vocab_size=g4.BENCH_VOCAB_SIZE,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=24,
        num_key_value_heads=4,
        head_dim=128,
        layer_types=layer_types,
        num_attention_heads_per_layer=[24 if t == F else 32 for t in layer_types],
        mlp_layer_types=["dense"] + ["sparse"] * 7,
        sliding_window=512,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        rope_parameters=json.loads(json.dumps(XS2_ROPE)),
        max_position_embeddings=131072,
        gating="per-head",
        moe_routed_scaling_factor=2.5,
        moe_router_logit_softcapping=0.0,
        tie_word_embeddings=False,
    )


def time_transformers(d, threads, runs=3):
    """The transformers timing of bench/transformers_bench.py, on the corpus's first 64 ids."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # as bench/transformers_bench.py runs it
    model = LagunaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = tok.encode(g4.CORPUS, add_special_tokens=True).ids[: g4.BENCH_PROMPT_TOKENS]
    assert len(ids) == g4.BENCH_PROMPT_TOKENS
    prompt = torch.tensor([ids])
    new = g4.BENCH_NEW_TOKENS
    prefill, decode = [], []
    with torch.no_grad():
        for r in range(runs + 1):  # the first run is a warm-up
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            t1 = time.perf_counter()
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            generated = [int(nxt)]
            t2 = time.perf_counter()
            for _ in range(new):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(int(nxt))
            t3 = time.perf_counter()
            if r:
                prefill.append(len(ids) / (t1 - t0))
                decode.append(new / (t3 - t2))
    return OrderedDict(
        threads=threads,
        runs=runs,
        prompt_tokens=len(ids),
        new_tokens=new,
        prefill_tok_s=round(statistics.median(prefill), 2),
        decode_tok_s=round(statistics.median(decode), 2),
        prefill_tok_s_all=[round(x, 2) for x in prefill],
        decode_tok_s_all=[round(x, 2) for x in decode],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        experts_implementation=model.config._experts_implementation,
        prompt_ids=ids,
        generated_ids=generated,
        method=f"prefill = one forward over the {len(ids)} prompt ids with a DynamicCache; decode = {new} "
        f"single-token forwards on that cache (greedy argmax), tok/s = {new} / their time; median of the runs "
        "after one warm-up",
    )


def make_bench(d, threads, runs, skip_write=False):
    if not skip_write:
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        torch.manual_seed(BENCH_SEED)
        model = LagunaForCausalLM(cfg_bench()).eval()
        counts = randomize(model, BENCH_SEED, weight_std=BENCH_WEIGHT_STD, scale_std=g4.SCALE_STD)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(d)
        tok = g4.build_tokenizer(g4.BENCH_VOCAB_SIZE)
        g4.write_tokenizer_files(d, tok, model_max_length=4096)
        print(f"wrote {d}: {n} parameters ({n * 4 / 1e9:.3f} GB f32), {counts['weight']} weight tensors")
        del model
    timing = time_transformers(d, threads, runs)
    n = 0
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(d, f), "pt") as fh:
                n += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    timing["parameters"] = n
    timing["transformers_version"] = transformers.__version__
    timing["torch_version"] = torch.__version__.split("+")[0]
    compact_json.dump(timing, os.path.join(d, "bench_transformers.json"))
    print(json.dumps(timing, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="subset of variant names")
    ap.add_argument("--bench", metavar="DIR", help="write the ~0.5 B bench checkpoint to DIR and time transformers")
    ap.add_argument("--bench-threads", type=int, default=2)
    ap.add_argument("--bench-runs", type=int, default=3, help="timed runs (median reported), after one warm-up")
    ap.add_argument("--bench-time-only", action="store_true", help="re-time an existing --bench DIR")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    g4.check_versions()
    if args.bench:
        make_bench(args.bench, args.bench_threads, args.bench_runs, skip_write=args.bench_time_only)
        return 0
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    prompt_ids = tok.encode(g4.TINY_PROMPT_TEXT, add_special_tokens=True).ids
    os.makedirs(OUT_ROOT, exist_ok=True)
    make_rope_reference()
    for name in args.only or list(VARIANTS):
        make_variant(name, VARIANTS[name], prompt_ids, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
