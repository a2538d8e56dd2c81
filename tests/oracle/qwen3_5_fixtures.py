#!/usr/bin/env python3
"""Tiny random Qwen3.5 / Qwen3.6 checkpoints (dense, MoE, multimodal wrapper) and the reference outputs.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/qwen3_5_fixtures.py      # -> tests/fixtures/qwen3_5/

For every variant in VARIANTS this script
  1. builds the variant's config and model: `dense` = `Qwen3_5ForCausalLM` (`qwen3_5_text`), `moe` =
     `Qwen3_5MoeForCausalLM` (`qwen3_5_moe_text`), `wrapper` = `Qwen3_5MoeForConditionalGeneration`
     (`qwen3_5_moe`, built from a Hub-form config.json dict shaped like Qwen3.6-35B-A3B's: `text_config` +
     a 1-block `vision_config`). Text dims: hidden 32, 8 layers [L L L F] x 2 (`full_attention_interval` 4),
     attention 4 heads x head_dim 32 over 2 KV heads with the output gate, partial rotary 0.25 (8 of 32
     dims) in the `mrope_section` / `mrope_interleaved` rope_parameters form; Gated DeltaNet 2 key heads x
     16, 4 value heads x 16, conv kernel 4; vocab 512,
  2. randomises EVERY saved parameter and buffer: Qwen3_5RMSNorm weights (used as 1 + w) = N(0, 0.2);
     Qwen3_5RMSNormGated weights (used as w) = 1 + N(0, 0.2); A_log = log U(A_MIN, A_MAX); dt_bias =
     1 + N(0, DT_BIAS_STD); depthwise conv1d weights = N(0, CONV_STD); vision LayerNorm weights = 1 +
     N(0, 0.2); everything else (router, shared-expert gate, biases included) = N(0, 0.2). bf16 variants
     round the weights to bf16 first (the seed search runs on the rounded values),
  3. writes a complete model folder with `save_pretrained` (+ the tokenizer files of
     tests/fixtures/gemma4/e2b-like, vocab 512, and a generation_config.json): `dense` f32; `moe` bf16
     (`model.to(bfloat16).save_pretrained`; no Qwen3.5 module is kept in fp32, so every tensor is BF16);
     `wrapper` bf16 sharded into 2 files (`max_shard_size` = 60 % of the total) with
     model.safetensors.index.json, and its config.json then replaced by the Hub form (what the real
     checkpoints ship: vision `model_type` "qwen3_5_moe", `deepstack_visual_indexes`, text keys
     `attn_output_gate`, `full_attention_interval`, `mamba_ssm_dtype`, `mtp_*`, `dtype`, ...),
  4. reloads the folder with `from_pretrained(dir, dtype=torch.float32)` (bf16 files are upcast on load,
     so the reference is what the files say) and checks the state dict equals the in-memory model,
  5. runs greedy `generate(use_cache=True)` from the 23-token prompt for 20 tokens, then ONE forward
     without a cache over the 43 tokens, and records the logits, the generated ids, the reference's cache
     (measure_cache.describe_cache), router top-k gaps, Gated DeltaNet decay / beta ranges, and the
     chunked-vs-recurrent comparisons below,
  6. writes `reference.safetensors` (`logits` [43, 512] f32, row i predicts token i + 1; `prompt_ids`,
     `generated_ids`) + `reference.json`. `dense` also stores the multi-chunk probe (`long_ids` [80],
     `long_logits` [80, 512] f32) and the cache after generate, as f32 (`cache.<layer>.conv_state` /
     `recurrent_state` on linear layers, `cache.<layer>.keys` / `values` on full layers).

The reference prefills with the CHUNKED gated delta rule (`torch_chunk_gated_delta_rule`, chunk 64) and
decodes with the RECURRENT one (`torch_recurrent_gated_delta_rule`). Every variant is asserted
self-consistent within STEP_TOLERANCE (1e-4):
  - each cached greedy step's logits (prefill 23 tokens chunked, then 19 recurrent steps) vs the full
    forward's rows (43 tokens, one chunk),
  - a forward (no cache) over every prefix prompt .. T-1 vs the full forward's rows,
  - multi-chunk: a forward without cache over `long_ids` (80 = 64 + 16, two chunks; the 43 tokens + 37
    seeded ordinary ids) vs a cached run over the same ids in calls of LONG_SCHEDULE tokens: a 70-token
    prefill (two chunks), 5 recurrent single-token steps, then one 5-token step on the cache (chunked
    kernel with an initial state, conv over the cached columns),
  - the two kernels on the SAME inputs: while the full / long forwards run, every call of the chunked
    kernel is repeated with the recurrent kernel on the same inputs and initial state (outputs and final
    state compared).
All max differences are recorded in reference.json.

A variant's weight seed is the first seed >= its base seed whose greedy continuation has no EOS, is
varied (>= 12 distinct ids, no run longer than 3), has a top-1/top-2 logit margin >= MIN_MARGIN at every
greedy decision (cached and full forward), whose generated ids are the full forward's argmax, and (MoE)
whose router picks are unambiguous: at every token of the full forward, on every layer, the k-th and
(k+1)-th router logits differ by >= MIN_ROUTER_GAP (the reference takes topk of softmax(logits), the same
experts), and whose self-consistency comparisons above are all within STEP_TOLERANCE. The last condition
is not a formality: the per-head gated RMSNorm of the Gated DeltaNet amplifies f32 rounding noise where a
head's core output is tiny, and some seeds of these very dims give a cached-vs-full difference of a few
1e-4 (recorded under `rejected_seeds`; the two kernels themselves agree to ~1e-6). reference.json also
records how far the router logits of the cached run are from the full forward's.

The wrapper's reference is the reloaded `Qwen3_5MoeForConditionalGeneration` (text-only input, so its 3-D
M-RoPE positions are the plain positions on all three axes). The text-only `Qwen3_5MoeForCausalLM` loaded
from the same folder (`model.language_model.*` -> `model.*`, `model.visual.*` ignored) is checked to give
the same logits.

--bench DIR: writes a ~0.54 B-parameter random checkpoint in Qwen3.6-35B-A3B's text shape
(`Qwen3_5MoeForCausalLM`, f32, vocab 32768: the fixtures' tokenizer padded with unused tokens, as
gemma4_fixtures.py --bench does; see cfg_bench), then times transformers on it into
DIR/bench_transformers.json (see bench/README.md); --bench-time-only re-times an existing DIR:

    /work/oracle-env/venv/bin/python tests/oracle/qwen3_5_fixtures.py --bench /work/bench-qwen

Deterministic: fixed seeds, CPU, torch.set_num_threads(1), torch.use_deterministic_algorithms(True); two
runs give byte-identical files. See tests/oracle/README.md ("Qwen3.5 / Qwen3.6 model fixtures").
"""

import argparse
import copy
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
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig
from transformers.cache_utils import DynamicCache
from transformers.models.qwen3_5 import modeling_qwen3_5 as mdl_dense
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as mdl_moe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402
import gemma4_fixtures as g4  # noqa: E402  (pinned versions, tokenizer ids, generation helpers)
from measure_cache import describe_cache  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures", "qwen3_5")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4", "e2b-like")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The prompt of deepseek_v4_fixtures.py: 23 ids with BOS; 23 + 20 = 43 tokens, all in one chunk of 64.
PROMPT_TEXT = "The robot and the boat ☕ on the river saw the light of a star"
MAX_NEW_TOKENS = 20
MIN_ROUTER_GAP = 1e-3  # k-th minus (k+1)-th router logit at every routed token (see router_gap)
MAX_SEED_TRIES = 300
STEP_TOLERANCE = 1e-4  # every self-consistency comparison (logits, kernel outputs / states)
LONG_TOKENS = 80  # multi-chunk probe: 80 = 64 + 16 tokens -> two chunks of the chunked kernel
# Its cached run, in calls of these lengths: a 70-token prefill (chunked, two chunks, no initial state), 5
# single-token steps (recurrent kernel, causal_conv1d_update), then one 5-token step on the cache (chunked kernel
# WITH an initial state; the conv runs over the 4 cached columns + the 5 new ones).
LONG_SCHEDULE = (70, 1, 1, 1, 1, 1, 5)
LONG_SEED = 4321
CHUNK_SIZE = 64  # torch_chunk_gated_delta_rule's default, what the reference uses

# Randomisation (besides g4.WEIGHT_STD = 0.2 and g4.SCALE_STD = 0.2).
A_MIN, A_MAX = 0.01, 0.5  # A = exp(A_log) ~ U(A_MIN, A_MAX); the reference initialises U(0.01, 16)
DT_BIAS_STD = 0.5  # dt_bias = 1 + N(0, DT_BIAS_STD); the reference initialises 1
CONV_STD = 0.5  # depthwise conv1d taps (kernel 4)

L, F = "linear_attention", "full_attention"
SHORT = {L: "L", F: "F"}


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def text_kwargs(**overrides):
    """The tiny text dims shared by all variants, as Qwen3_5TextConfig / Qwen3_5MoeTextConfig kwargs, with
    the extra keys the real text configs carry (kept verbatim in config.json as unknown attributes; the
    reference ignores them: the output gate is always on, the torch path always keeps the state in f32)."""
    kw = OrderedDict(
        vocab_size=g4.VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=8,
        full_attention_interval=4,  # -> layer_types [L L L F] x 2 (consumed; save_pretrained writes layer_types)
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        attn_output_gate=True,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        partial_rotary_factor=0.25,
        rope_parameters=OrderedDict(
            mrope_interleaved=True,
            mrope_section=[2, 1, 1],  # sums to rotary_dim / 2 = 32 * 0.25 / 2 = 4, as [11, 11, 10] sums to 32
            partial_rotary_factor=0.25,
            rope_theta=10000.0,
            rope_type="default",
        ),
        mamba_ssm_dtype="float32",
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
        tie_word_embeddings=False,
        bos_token_id=g4.BOS_ID,
        eos_token_id=g4.EOS_ID,
    )
    kw.update(overrides)
    return kw


def cfg_dense():
    # Qwen3.6-27B in miniature: dense SwiGLU MLP 48 wide, rope_theta 1e4 (not the real 1e7, so that all
    # four rotary frequencies turn noticeably over 43 positions), output_gate_type "swish" as in the 27B.
    return Qwen3_5TextConfig(**text_kwargs(intermediate_size=48, output_gate_type="swish"))


def cfg_moe():
    # Qwen3.6-35B-A3B in miniature: 8 experts x 24, top-2 (softmax, renormalised) + a 40-wide shared expert
    # with its sigmoid gate, on every layer; rope_theta 1e5. The widths differ from hidden (32) and from each
    # other so that no expert matrix is square (a transposed gate/up/down cannot pass unnoticed).
    return Qwen3_5MoeTextConfig(
        **text_kwargs(
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.001,
            output_router_logits=False,
            rope_parameters=OrderedDict(text_kwargs()["rope_parameters"], rope_theta=100000.0),
        )
    )


def hub_wrapper():
    """config.json of the wrapper in the form of Qwen3.6-35B-A3B's (key order and the transformers 4.57.1
    extras verbatim), with tiny sizes: 6 experts x 24 top-3 + shared expert 40, rope_theta 1e7 as shipped,
    a 1-block vision tower (hidden 32, patch 8, 8 x 8 position grid, out_hidden_size = text hidden 32). The
    special vision token ids are the real ones (outside the 512 vocab; unused by text-only inference)."""
    layers = [L if (i + 1) % 4 else F for i in range(8)]
    text = OrderedDict(
        [
            ("attention_bias", False),
            ("attention_dropout", 0.0),
            ("attn_output_gate", True),
            ("bos_token_id", g4.BOS_ID),
            ("dtype", "bfloat16"),
            ("eos_token_id", g4.EOS_ID),
            ("full_attention_interval", 4),
            ("head_dim", 32),
            ("hidden_act", "silu"),
            ("hidden_size", 32),
            ("initializer_range", 0.02),
            ("layer_types", layers),
            ("linear_conv_kernel_dim", 4),
            ("linear_key_head_dim", 16),
            ("linear_num_key_heads", 2),
            ("linear_num_value_heads", 4),
            ("linear_value_head_dim", 16),
            ("mamba_ssm_dtype", "float32"),
            ("max_position_embeddings", 256),
            ("model_type", "qwen3_5_moe_text"),
            ("moe_intermediate_size", 24),
            ("mtp_num_hidden_layers", 1),
            ("mtp_use_dedicated_embeddings", False),
            ("num_attention_heads", 4),
            ("num_experts", 6),
            ("num_experts_per_tok", 3),
            ("num_hidden_layers", 8),
            ("num_key_value_heads", 2),
            ("output_router_logits", False),
            ("pad_token_id", None),
            ("partial_rotary_factor", 0.25),
            ("rms_norm_eps", 1e-06),
            (
                "rope_parameters",
                OrderedDict(
                    [
                        ("mrope_interleaved", True),
                        ("mrope_section", [2, 1, 1]),
                        ("partial_rotary_factor", 0.25),
                        ("rope_theta", 10000000),
                        ("rope_type", "default"),
                    ]
                ),
            ),
            ("router_aux_loss_coef", 0.001),
            ("shared_expert_intermediate_size", 40),
            ("tie_word_embeddings", False),
            ("use_cache", True),
            ("vocab_size", g4.VOCAB_SIZE),
        ]
    )
    vision = OrderedDict(
        [
            ("deepstack_visual_indexes", []),
            ("depth", 1),
            ("hidden_act", "gelu_pytorch_tanh"),
            ("hidden_size", 32),
            ("in_channels", 3),
            ("initializer_range", 0.02),
            ("intermediate_size", 64),
            ("model_type", "qwen3_5_moe"),
            ("num_heads", 2),
            ("num_position_embeddings", 64),
            ("out_hidden_size", 32),
            ("patch_size", 8),
            ("spatial_merge_size", 2),
            ("temporal_patch_size", 2),
        ]
    )
    return OrderedDict(
        [
            ("architectures", ["Qwen3_5MoeForConditionalGeneration"]),
            ("image_token_id", 248056),
            ("model_type", "qwen3_5_moe"),
            ("text_config", text),
            ("tie_word_embeddings", False),
            ("transformers_version", "4.57.1"),
            ("video_token_id", 248057),
            ("vision_config", vision),
            ("vision_end_token_id", 248054),
            ("vision_start_token_id", 248053),
        ]
    )


def cfg_wrapper():
    return Qwen3_5MoeConfig.from_dict(json.loads(json.dumps(hub_wrapper())))


VARIANTS = OrderedDict(
    [
        (
            "dense",
            dict(
                cls="Qwen3_5ForCausalLM",
                config=cfg_dense,
                dtype="float32",
                seed=100,
                extra_tensors=True,
                covers="Qwen3_5ForCausalLM (model_type qwen3_5_text), bare text config.json as save_pretrained "
                "writes it; 8 layers L L L F L L L F; dense SwiGLU MLP 48 wide; rope_theta 1e4; f32 files",
            ),
        ),
        (
            "moe",
            dict(
                cls="Qwen3_5MoeForCausalLM",
                config=cfg_moe,
                dtype="bfloat16",
                seed=200,
                covers="Qwen3_5MoeForCausalLM (model_type qwen3_5_moe_text), bare text config.json as save_pretrained "
                "writes it; 8 layers L L L F L L L F; every layer sparse: 8 experts x 24 top-2 (softmax, "
                "renormalised) + shared expert 40 with sigmoid gate; rope_theta 1e5; bf16 files (one file)",
            ),
        ),
        (
            "wrapper",
            dict(
                cls="Qwen3_5MoeForConditionalGeneration",
                config=cfg_wrapper,
                hub=hub_wrapper,
                dtype="bfloat16",
                seed=300,
                shards=2,
                covers="Qwen3_5MoeForConditionalGeneration (model_type qwen3_5_moe) as Qwen3.6-35B-A3B ships: Hub-form "
                "config.json (text_config + vision_config, transformers_version 4.57.1 extras), weights under "
                "model.language_model. / model.visual. / lm_head., bf16, 2 shards + model.safetensors.index.json; "
                "text: 8 layers L L L F L L L F, 6 experts x 24 top-3 + shared expert 40, rope_theta 1e7 (as "
                "shipped); vision: 1 block, hidden 32, patch 8 (not run: text-only input)",
            ),
        ),
    ]
)


def text_config_of(cfg):
    return cfg.get_text_config(decoder=True)


def config_summary(cfg):
    t = text_config_of(cfg)
    out = OrderedDict(
        model_type=cfg.model_type,
        text_model_type=t.model_type,
        layer_types=[SHORT[x] for x in t.layer_types],
        hidden_size=t.hidden_size,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        linear_num_key_heads=t.linear_num_key_heads,
        linear_key_head_dim=t.linear_key_head_dim,
        linear_num_value_heads=t.linear_num_value_heads,
        linear_value_head_dim=t.linear_value_head_dim,
        linear_conv_kernel_dim=t.linear_conv_kernel_dim,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters=json.loads(json.dumps(t.rope_parameters)),
        tie_word_embeddings=cfg.tie_word_embeddings,
        vocab_size=t.vocab_size,
    )
    if hasattr(t, "num_experts"):
        out.update(
            num_experts=t.num_experts,
            num_experts_per_tok=t.num_experts_per_tok,
            moe_intermediate_size=t.moe_intermediate_size,
            shared_expert_intermediate_size=t.shared_expert_intermediate_size,
        )
    else:
        out["intermediate_size"] = t.intermediate_size
    return out


# --------------------------------------------------------------------------------------
# Randomisation
# --------------------------------------------------------------------------------------

ONE_PLUS_W_NORMS = (mdl_dense.Qwen3_5RMSNorm, mdl_moe.Qwen3_5MoeRMSNorm)  # y = x_hat * (1 + w)
GATED_NORMS = (mdl_dense.Qwen3_5RMSNormGated, mdl_moe.Qwen3_5MoeRMSNormGated)  # y = w * x_hat * silu(z)
DELTA_NETS = (mdl_dense.Qwen3_5GatedDeltaNet, mdl_moe.Qwen3_5MoeGatedDeltaNet)


def param_kinds(model):
    """{state-dict name: kind} for the names that are not plain weights."""
    kinds = {}
    for n, m in model.named_modules():
        p = f"{n}." if n else ""
        if isinstance(m, ONE_PLUS_W_NORMS):
            kinds[p + "weight"] = "rmsnorm_1p"
        elif isinstance(m, GATED_NORMS):
            kinds[p + "weight"] = "rmsnorm_gated"
        elif isinstance(m, torch.nn.LayerNorm):
            kinds[p + "weight"] = "layernorm"
        elif isinstance(m, DELTA_NETS):
            kinds[p + "A_log"] = "A_log"
            kinds[p + "dt_bias"] = "dt_bias"
            kinds[p + "conv1d.weight"] = "conv"
    return kinds


@torch.no_grad()
def randomize(model, seed, bf16, weight_std=g4.WEIGHT_STD):
    g = torch.Generator().manual_seed(seed)
    kinds = param_kinds(model)
    sd = model.state_dict()
    seen = set()
    counts = OrderedDict((k, 0) for k in ("rmsnorm_1p", "rmsnorm_gated", "layernorm", "A_log", "dt_bias", "conv", "weight"))
    for name in sorted(sd):
        t = sd[name]
        ptr = t.untyped_storage().data_ptr()
        assert ptr not in seen, f"{name}: shared storage (no tied weights expected)"
        seen.add(ptr)
        kind = kinds.get(name, "weight")
        if kind == "A_log":
            u = torch.rand(t.shape, generator=g, dtype=torch.float32)
            val = torch.log(A_MIN + (A_MAX - A_MIN) * u)
        else:
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if kind == "rmsnorm_1p":
                val = g4.SCALE_STD * noise
            elif kind in ("rmsnorm_gated", "layernorm"):
                val = 1.0 + g4.SCALE_STD * noise
            elif kind == "dt_bias":
                val = 1.0 + DT_BIAS_STD * noise
            elif kind == "conv":
                val = CONV_STD * noise
            else:
                val = weight_std * noise
        if bf16:
            val = val.to(torch.bfloat16)
        t.copy_(val.to(t.dtype))
        counts[kind] += 1
    for name, t in model.state_dict().items():
        assert t.float().flatten().std() > 0, f"{name} is constant"
    buffers = [n for n, _ in model.named_buffers() if n in sd]
    assert not buffers, f"persistent buffers not expected: {buffers}"
    return counts


# --------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------


@torch.no_grad()
def router_gap(model, seq):
    """Smallest gap between the k-th and (k+1)-th router LOGIT over all tokens of one full forward and all MoE
    layers (None for dense models). The reference selects with topk on softmax(logits), which picks the same
    experts as topk on the logits; the gap is taken on the logits because that is where the f32 noise of an
    implementation lands (see RouterRecorder)."""
    routers = [m for m in model.modules() if isinstance(m, mdl_moe.Qwen3_5MoeTopKRouter)]
    if not routers:
        return None
    gaps = []

    def hook(mod, args, out):
        top = torch.topk(out[0].float(), mod.top_k + 1, dim=-1).values
        gaps.append(float((top[:, mod.top_k - 1] - top[:, mod.top_k]).min()))

    hs = [r.register_forward_hook(hook) for r in routers]
    try:
        model(input_ids=seq[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return min(gaps)


class RouterRecorder:
    """Records every router's logits per call; `cached_vs_full` compares the rows of a cached generate (the
    first calls) with the rows of the last call (the full forward)."""

    def __init__(self, model):
        self.routers = [m for m in model.modules() if isinstance(m, mdl_moe.Qwen3_5MoeTopKRouter)]
        self.calls = {id(r): [] for r in self.routers}
        self.hooks = []

    def __enter__(self):
        for r in self.routers:
            self.hooks.append(r.register_forward_hook(lambda mod, args, out: self.calls[id(mod)].append(out[0].float())))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False

    def cached_vs_full(self, generate_calls):
        if not self.routers:
            return None
        worst = 0.0
        for r in self.routers:
            rows = self.calls[id(r)]
            cached = torch.cat(rows[:generate_calls])
            full = rows[generate_calls]
            worst = max(worst, float((cached - full[: cached.shape[0]]).abs().max()))
        return worst


@torch.no_grad()
def delta_stats(model, seq):
    """Per linear layer of one full forward: the range of the per-token decay exp(g) and of beta."""
    rows = []

    def hook(mod, args, kwargs, out):
        h = kwargs.get("hidden_states", args[0] if args else None)
        a = mod.in_proj_a(h).float()
        b = mod.in_proj_b(h).float()
        g = -mod.A_log.float().exp() * torch.nn.functional.softplus(a + mod.dt_bias)
        decay, beta = g.exp(), b.sigmoid()
        rows.append(
            OrderedDict(
                layer=mod.layer_idx,
                A=[round(float(x), 4) for x in mod.A_log.float().exp()],
                decay_min=round(float(decay.min()), 4),
                decay_mean=round(float(decay.mean()), 4),
                decay_max=round(float(decay.max()), 4),
                beta_min=round(float(beta.min()), 4),
                beta_max=round(float(beta.max()), 4),
            )
        )

    hs = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, DELTA_NETS)]
    try:
        model(input_ids=seq[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return rows


class KernelComparison:
    """While active, every call of the chunked gated-delta-rule kernel (in both modeling modules) is repeated
    with the recurrent kernel on the same inputs; the largest output / final-state differences are kept."""

    def __init__(self):
        self.out_diff = 0.0
        self.state_diff = 0.0
        self.calls = 0
        self.max_len = 0
        self.saved = []

    def __enter__(self):
        for mod in (mdl_dense, mdl_moe):
            chunk, recur = mod.torch_chunk_gated_delta_rule, mod.torch_recurrent_gated_delta_rule

            def wrapped(query, key, value, g, beta, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, _chunk=chunk, _recur=recur, **kwargs):
                out, state = _chunk(query, key, value, g=g, beta=beta, initial_state=initial_state,
                                    output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
                r_out, r_state = _recur(query, key, value, g=g, beta=beta, initial_state=initial_state,
                                        output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
                self.out_diff = max(self.out_diff, float((out.float() - r_out.float()).abs().max()))
                self.state_diff = max(self.state_diff, float((state - r_state).abs().max()))
                self.calls += 1
                self.max_len = max(self.max_len, query.shape[1])
                return out, (state if output_final_state else None)

            self.saved.append((mod, chunk))
            mod.torch_chunk_gated_delta_rule = wrapped
        return self

    def __exit__(self, *exc):
        for mod, chunk in self.saved:
            mod.torch_chunk_gated_delta_rule = chunk
        return False


@torch.no_grad()
def prefix_max_abs_diff(model, seq, p, full):
    """Forwards (no cache) over every prefix from the prompt up: their rows must equal the full forward's."""
    worst = 0.0
    for n in range(p, len(seq)):
        logits = model(input_ids=seq[None, :n], use_cache=False).logits[0].float()
        worst = max(worst, float((logits - full[:n]).abs().max()))
    return worst


def long_ids(seq):
    g = torch.Generator().manual_seed(LONG_SEED)
    extra = torch.randint(g4.NUM_SPECIAL, g4.VOCAB_SIZE, (LONG_TOKENS - len(seq),), generator=g)
    return torch.cat([seq, extra])


@torch.no_grad()
def multi_chunk_run(model, ids):
    """Full forward (no cache) over `ids` vs a cached run in calls of LONG_SCHEDULE lengths."""
    assert sum(LONG_SCHEDULE) == len(ids)
    full = model(input_ids=ids[None], use_cache=False).logits[0].float()
    cache = DynamicCache(config=model.config)
    rows, t = [], 0
    for n in LONG_SCHEDULE:
        out = model(input_ids=ids[None, t : t + n], past_key_values=cache, use_cache=True)
        rows.append(out.logits[0].float())
        t += n
    cached = torch.cat(rows)
    return full, float((cached - full).abs().max())


@torch.no_grad()
def reference_run(model, prompt_ids):
    """Greedy generate with the default cache, then one full forward (no cache) over the final sequence."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    seq = out.sequences[0]
    p = len(prompt_ids)
    generated = seq[p:].tolist()
    full = model(input_ids=seq[None], use_cache=False).logits[0].float()  # [T, V]
    step = torch.stack([x[0].float() for x in out.logits])  # step k predicts token p + k
    full_at_steps = full[p - 1 : p - 1 + len(generated)]
    argmax = full.argmax(-1)
    mismatch = [p + k for k, t in enumerate(generated) if int(argmax[p - 1 + k]) != t]
    return dict(
        sequence=seq,
        generated=generated,
        logits=full,
        cache=out.past_key_values,
        step_max_abs_diff=float((step - full_at_steps).abs().max()),
        mismatch=mismatch,
        decision_margin=float(g4.top2_margins(step).min()),  # the greedy decisions were taken on these
        full_margin=float(g4.top2_margins(full_at_steps).min()),
        finite=bool(torch.isfinite(full).all() and torch.isfinite(step).all()),
    )


def acceptable(run, gap):
    gen = run["generated"]
    return (
        run["finite"]
        and len(gen) == MAX_NEW_TOKENS
        and not (set(gen) & set(g4.EOS_IDS))
        and not run["mismatch"]
        and run["decision_margin"] >= g4.MIN_MARGIN
        and run["full_margin"] >= g4.MIN_MARGIN
        and len(set(gen)) >= g4.MIN_DISTINCT
        and g4.longest_run(gen) <= g4.MAX_RUN
        and (gap is None or gap >= MIN_ROUTER_GAP)
    )


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def fresh_dir(name):
    d = os.path.join(OUT_ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_common_files(d):
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(d, f))
    write_json(os.path.join(d, "generation_config.json"), g4.generation_config())


def weight_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors")


def file_layout(d):
    """{tensor name: (file, dtype, shape)} over the folder's weight files, from their headers."""
    out = {}
    for fname in weight_files(d):
        with open(os.path.join(d, fname), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for k, v in header.items():
            assert k not in out, k
            out[k] = (fname, v["dtype"], v["shape"])
    return OrderedDict(sorted(out.items()))


def layout_summary(layout, text_cfg):
    """The tensor names per module kind: every tensor of the first linear-attention layer and of the first
    full-attention layer (layer index replaced by {i}), the non-layer tensors, prefixes and dtypes."""
    first_linear = text_cfg.layer_types.index(L)
    first_full = text_cfg.layer_types.index(F)
    per_kind = OrderedDict([("non_layer", OrderedDict()), (L, OrderedDict()), (F, OrderedDict())])
    prefixes, dtypes, files = OrderedDict(), OrderedDict(), OrderedDict()
    experts = set()
    for name, (fname, dtype, shape) in layout.items():
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        files[fname] = files.get(fname, 0) + 1
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            prefix = ".".join(parts[: i + 1]) + "."
            idx = int(parts[i + 1])
            prefixes[prefix + "{i}."] = prefixes.get(prefix + "{i}.", 0) + 1
            rest = ".".join(parts[i + 2 :])
            if rest.startswith("mlp.experts.") and rest.split(".")[2].isdigit():
                e = rest.split(".")[2]
                experts.add(int(e))
                rest = rest.replace(f"mlp.experts.{e}.", "mlp.experts.{e}.", 1)
            if idx == first_linear:
                per_kind[L][f"{prefix}{{i}}.{rest}"] = [dtype, shape]
            elif idx == first_full:
                per_kind[F][f"{prefix}{{i}}.{rest}"] = [dtype, shape]
        else:
            top = ".".join(parts[:2]) + "." if parts[0] == "model" and len(parts) > 2 else parts[0] + "."
            prefixes[top] = prefixes.get(top, 0) + 1
            if parts[0] != "model" or parts[1] != "visual":
                per_kind["non_layer"][name] = [dtype, shape]
    visual = sorted({n for n in layout if n.startswith("model.visual.")})
    out = OrderedDict(
        tensor_count=len(layout),
        dtypes=dtypes,
        files=files,
        prefixes=prefixes,
        names=per_kind,
    )
    if experts:
        out["experts_per_layer"] = f"{len(experts)} (one tensor per expert and projection: mlp.experts.{{e}}.*, e = 0..{max(experts)})"
    if visual:
        out["visual"] = OrderedDict((n, [layout[n][1], layout[n][2]]) for n in visual)
    return out


def save_model(model, d, spec):
    if spec["dtype"] == "bfloat16":
        m16 = copy.deepcopy(model).to(torch.bfloat16)
        if spec.get("shards"):
            total = sum(t.numel() * t.element_size() for t in m16.state_dict().values())
            m16.save_pretrained(d, max_shard_size=int(total * 0.6))
        else:
            m16.save_pretrained(d)
    else:
        model.save_pretrained(d)
    if spec.get("shards"):
        files = weight_files(d)
        assert len(files) == spec["shards"], files
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    if spec.get("hub"):
        write_json(os.path.join(d, "config.json"), spec["hub"](), indent=4)


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


def build(spec, seed):
    cfg = spec["config"]()
    torch.manual_seed(seed)
    # .float(): built from the Hub config, the wrapper's language model would follow text_config "dtype" (bf16).
    model = getattr(transformers, spec["cls"])(cfg).float().eval()
    counts = randomize(model, seed, spec["dtype"] == "bfloat16")
    return model, counts


def cache_block(cache, text_cfg, tokens):
    layers, total, total_storage = describe_cache(cache, text_cfg)
    return OrderedDict(
        tokens=tokens,
        total_bytes=total,
        total_storage_bytes=total_storage,
        layers=[
            OrderedDict(
                layer=Lr["decoder_layer"],
                type=SHORT[Lr["decoder_layer_type"]],
                cache_class=Lr["layer_class"],
                bytes=Lr["bytes"],
                meta=Lr["meta"],
                tensors=OrderedDict(
                    (t["name"], [t["dtype"], t["shape"]])
                    for t in Lr["tensors"]
                    if not t.get("bookkeeping") and not t.get("alias_of")
                ),
            )
            for Lr in layers
        ],
    )


def cache_tensors(cache, text_cfg):
    out = OrderedDict()
    for i, layer in enumerate(cache.layers):
        if text_cfg.layer_types[i] == L:
            out[f"cache.{i}.conv_state"] = layer.conv_states[0].float().contiguous()
            out[f"cache.{i}.recurrent_state"] = layer.recurrent_states[0].float().contiguous()
        else:
            out[f"cache.{i}.keys"] = layer.keys.float().contiguous()
            out[f"cache.{i}.values"] = layer.values.float().contiguous()
    return out


def text_only_check(d, sequence, logits):
    """The text causal LM loaded from the wrapper folder: loading info and max |logits - wrapper's|."""
    m, info = Qwen3_5MoeForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    m.eval()
    with torch.no_grad():
        text_logits = m(input_ids=sequence[None], use_cache=False).logits[0].float()
    problems = {k: sorted(v) for k, v in info.items() if v}
    assert not problems, problems
    return OrderedDict(
        [("class", "Qwen3_5MoeForCausalLM")],
        config_class=type(m.config).__name__,
        loading_info="no missing / unexpected / mismatched keys: model.language_model.* -> model.* (the qwen3_5_text "
        "PrefixChange), model.visual.* dropped silently (_keys_to_ignore_on_load_unexpected)",
        logits_max_abs_diff_vs_wrapper=float(f"{float((text_logits - logits).abs().max()):.3g}"),
    )


def evaluate(model, prompt_ids):
    """The reference run plus every self-consistency comparison (see the module docstring)."""
    with KernelComparison() as kc, RouterRecorder(model) as rr:
        run = reference_run(model, prompt_ids)
        seq = run["sequence"]
        router_noise = rr.cached_vs_full(MAX_NEW_TOKENS)  # generate = prefill + 19 decode steps, then the full forward
        gap = router_gap(model, seq)
        lids = long_ids(seq)
        long_logits, long_diff = multi_chunk_run(model, lids)
    assert kc.max_len == LONG_TOKENS, kc.max_len
    prefix_diff = prefix_max_abs_diff(model, seq, len(prompt_ids), run["logits"])
    checks = OrderedDict(
        cached_vs_full_max_abs_diff=run["step_max_abs_diff"],
        prefix_vs_full_max_abs_diff=prefix_diff,
        multi_chunk_cached_vs_full_max_abs_diff=long_diff,
        kernel_chunked_vs_recurrent_output_max_abs_diff=kc.out_diff,
        kernel_chunked_vs_recurrent_state_max_abs_diff=kc.state_diff,
    )
    return dict(run=run, gap=gap, router_noise=router_noise, long_ids=lids, long_logits=long_logits, checks=checks,
                kernel_calls=kc.calls)


def make_variant(name, spec, prompt_ids, quiet=False):
    bf16 = spec["dtype"] == "bfloat16"
    rejected = []  # seeds that pass the greedy criteria but not the self-consistency ones
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        model, counts = build(spec, seed)
        run = reference_run(model, prompt_ids)
        if not acceptable(run, router_gap(model, run["sequence"])):
            continue
        ev = evaluate(model, prompt_ids)
        worst = max(ev["checks"].items(), key=lambda kv: kv[1])
        if worst[1] <= STEP_TOLERANCE:
            break
        rejected.append(OrderedDict(seed=seed, **{k: float(f"{v:.3g}") for k, v in ev["checks"].items()}))
    else:
        raise SystemExit(f"{name}: no seed in {MAX_SEED_TRIES} tries gives an acceptable greedy run")
    in_memory = {k: v.clone() for k, v in model.state_dict().items()}

    d = fresh_dir(name)
    save_model(model, d, spec)
    write_common_files(d)

    # The reference is the reloaded folder, run in float32 (bf16 files upcast on load).
    ref, problems = g4.load(d, spec["cls"], torch.float32)
    assert not problems, f"{name}: loading info {problems}"
    assert all(p.dtype == torch.float32 for p in ref.state_dict().values())
    diff = g4.state_dicts_equal(in_memory, ref.state_dict())
    assert not diff, f"{name}: {diff[:5]}"
    assert config_summary(ref.config) == config_summary(model.config), f"{name}: reloaded config differs"
    text_cfg = text_config_of(ref.config)

    probe = ev
    ev = evaluate(ref, prompt_ids)
    run, gap, router_noise, checks = ev["run"], ev["gap"], ev["router_noise"], ev["checks"]
    seq, lids, long_logits = run["sequence"], ev["long_ids"], ev["long_logits"]
    assert acceptable(run, gap), f"{name}: reloaded model differs from the probe"
    assert torch.equal(run["logits"], probe["run"]["logits"]), f"{name}: reloaded logits differ from the probe"
    for k, v in checks.items():
        assert v <= STEP_TOLERANCE, f"{name}: {k} = {v}"
    stats = delta_stats(ref, seq)

    text_only = text_only_check(d, seq, run["logits"]) if spec["cls"].endswith("ConditionalGeneration") else None

    cache_tokens = len(seq) - 1
    cache = cache_block(run["cache"], text_cfg, cache_tokens)
    tensors = OrderedDict(
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        generated_ids=torch.tensor(run["generated"], dtype=torch.int64),
        logits=run["logits"].contiguous(),
    )
    if spec.get("extra_tensors"):  # size: only one variant stores the multi-chunk logits and the cache
        tensors.update(long_ids=lids.to(torch.int64).contiguous(), long_logits=long_logits.contiguous())
        tensors.update(cache_tensors(run["cache"], text_cfg))
    rot = (ref.model.language_model if hasattr(ref.model, "language_model") else ref.model).rotary_emb
    layout = file_layout(d)
    r = lambda x: float(f"{x:.3g}")  # noqa: E731
    notes = [
        spec["covers"] + ".",
        f"Weights: seed {seed}; {counts['rmsnorm_1p']} Qwen3_5RMSNorm weights (applied as 1 + w) = N(0, {g4.SCALE_STD}); "
        f"{counts['rmsnorm_gated']} Qwen3_5RMSNormGated weights (applied as w) = 1 + N(0, {g4.SCALE_STD}); "
        f"{counts['A_log']} A_log = log U({A_MIN}, {A_MAX}); {counts['dt_bias']} dt_bias = 1 + N(0, {DT_BIAS_STD}); "
        f"{counts['conv']} conv1d weights = N(0, {CONV_STD}); {counts['layernorm']} vision LayerNorm weights = 1 + "
        f"N(0, {g4.SCALE_STD}); {counts['weight']} others = N(0, {g4.WEIGHT_STD})"
        + ("; rounded to bf16" if bf16 else "")
        + ".",
        f"logits: ONE forward with use_cache=False over prompt + generated ({len(seq)} positions, one chunk of "
        f"{CHUNK_SIZE}), float32 (from_pretrained(dtype=torch.float32)"
        + (", bf16 files upcast on load" if bf16 else "")
        + "); row i predicts token i + 1.",
        f"Chunked (prefill) vs recurrent (decode) gated delta rule: cached greedy steps vs full forward "
        f"{r(run['step_max_abs_diff'])}; prefix forwards vs full {r(checks['prefix_vs_full_max_abs_diff'])}; "
        f"multi-chunk ({LONG_TOKENS} tokens, full forward = 2 chunks vs cached calls of {list(LONG_SCHEDULE)} tokens: "
        "2-chunk prefill, recurrent steps, then a chunked step with an initial state) "
        f"{r(checks['multi_chunk_cached_vs_full_max_abs_diff'])}; the two kernels on identical inputs ({ev['kernel_calls']} "
        f"calls, up to {LONG_TOKENS} tokens): output {r(checks['kernel_chunked_vs_recurrent_output_max_abs_diff'])}, final "
        f"state {r(checks['kernel_chunked_vs_recurrent_state_max_abs_diff'])}. All within {STEP_TOLERANCE}"
        + (f"; {len(rejected)} earlier seeds passed the greedy criteria but not these (see rejected_seeds)" if rejected else "")
        + ".",
        f"Min top-1/top-2 margin at the greedy decisions: {run['decision_margin']:.4f} (cached), "
        f"{run['full_margin']:.4f} (full forward)"
        + (
            f"; min router gap (k-th - (k+1)-th router logit, full forward): {gap:.4f}; max |router logits of the cached "
            f"run - full forward| {r(router_noise)}"
            if gap is not None
            else ""
        )
        + ".",
        f"Cache after generate holds {cache_tokens} tokens (the last generated token is not fed): {cache['total_bytes']} B. "
        "Linear layers: conv_states[0] = the last linear_conv_kernel_dim (4, not 3) in_proj_qkv outputs before the "
        "conv, [1, conv_dim, 4], model dtype; recurrent_states[0] [1, linear_num_value_heads, linear_key_head_dim, "
        "linear_value_head_dim], float32. Full layers: keys / values [1, num_key_value_heads, tokens, head_dim] "
        "(keys after k_norm and RoPE).",
    ]
    if text_only:
        notes.append(
            "Text-only check: Qwen3_5MoeForCausalLM.from_pretrained(this folder) loads the language model "
            "(model.language_model.* -> model.*; model.visual.* dropped silently) and gives logits within "
            f"{text_only['logits_max_abs_diff_vs_wrapper']} of the wrapper's."
        )
    doc = OrderedDict(
        generator="tests/oracle/qwen3_5_fixtures.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        variant=name,
        **{"class": spec["cls"]},
        file_dtype=spec["dtype"],
        reference_dtype="float32",
        seed=seed,
        prompt_text=PROMPT_TEXT,
        prompt_ids=prompt_ids,
        generated_ids=run["generated"],
        eos_ids=g4.EOS_IDS,
        max_new_tokens=MAX_NEW_TOKENS,
        self_consistent=True,
        cached_equals_full_argmax=not run["mismatch"],
        min_top2_margin=round(run["decision_margin"], 6),
        min_top2_margin_full_forward=round(run["full_margin"], 6),
        min_router_gap=None if gap is None else round(gap, 6),
        router_logits_cached_vs_full_max_abs_diff=None if router_noise is None else r(router_noise),
        chunked_vs_recurrent=OrderedDict(
            chunk_size=CHUNK_SIZE,
            tolerance=STEP_TOLERANCE,
            **{k: r(v) for k, v in checks.items()},
            kernel_calls=ev["kernel_calls"],
            long_tokens=LONG_TOKENS,
            long_cached_calls=list(LONG_SCHEDULE),
            long_seed=LONG_SEED,
        ),
        rejected_seeds=rejected,
        config=config_summary(ref.config),
        rope=OrderedDict(
            inv_freq=rot.inv_freq.tolist(),
            attention_scaling=rot.attention_scaling,
            rotary_dim=2 * rot.inv_freq.numel(),
            mrope_section=list(rot.mrope_section),
        ),
        gated_delta_net=stats,
        cache=cache,
        weights=layout_summary(layout, text_cfg),
        notes=notes,
    )
    if text_only:
        doc["text_only_load"] = text_only
    doc["reference_tensors"] = "reference.safetensors: logits [43, 512] f32, prompt_ids [23], generated_ids [20]"
    if spec.get("extra_tensors"):
        doc["reference_tensors"] = (
            "reference.safetensors: logits [43, 512] f32, prompt_ids [23], generated_ids [20], long_ids [80], "
            "long_logits [80, 512] f32 (one forward without cache over long_ids), and the cache after generate (42 "
            "tokens) as f32: cache.{i}.conv_state [1, 128, 4] and cache.{i}.recurrent_state [1, 4, 16, 16] on "
            "linear layers, cache.{i}.keys / cache.{i}.values [1, 2, 42, 32] on full layers"
        )
    safetensors.torch.save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    compact_json.dump(doc, os.path.join(d, "reference.json"))
    if not quiet:
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(
            f"{name:<8} seed {seed} T={len(seq)} gen={run['generated']} margin={run['decision_margin']:.3f}/"
            f"{run['full_margin']:.3f} router gap={gap} checks={ {k: f'{v:.2g}' for k, v in checks.items()} } "
            f"cache={cache['total_bytes']} B files={size} B"
        )
    return doc


# --------------------------------------------------------------------------------------
# Bench checkpoint
# --------------------------------------------------------------------------------------

BENCH_SEED = 7
BENCH_WEIGHT_STD = 0.02  # small weights keep the activations ordinary (as the Gemma / Laguna bench models)


# The real text config's values the bench keeps verbatim (Qwen3.6-35B-A3B's config.json, text_config).
REAL_TEXT = dict(
    max_position_embeddings=262144,
    rope_parameters=OrderedDict(
        mrope_interleaved=True,
        mrope_section=[11, 11, 10],
        partial_rotary_factor=0.25,
        rope_theta=10000000,
        rope_type="default",
    ),
)


def cfg_bench():
    # Qwen3.6-35B-A3B's text model (hidden 2048, 40 layers [L L L F] x 10; attention 16 heads x 256 over 2 KV
    # heads with the output gate, partial rotary 0.25; Gated DeltaNet 16 key heads x 128 and 32 value heads x 128,
    # conv 4; every layer 256 experts x 512 top-8 + a 512-wide shared expert with its sigmoid gate; untied head)
    # scaled to ~0.54 B: hidden 1024; 8 layers [L L L F] x 2; attention 8 heads x 256 over 1 KV head (the same
    # 8:1 grouping, query width 2x hidden, head_dim and rotary dims 64 of 256 verbatim); DeltaNet 8 key heads x 128,
    # 16 value heads x 128 (the same 2:1 heads, key width 1x and value width 2x hidden); 64 experts x 256 (hidden / 4,
    # as 512 / 2048), top-8, + a 256-wide shared expert. rope_parameters (M-RoPE sections [11, 11, 10], theta 1e7),
    # max positions and the extra keys verbatim; vocab 32768 (the Gemma bench's padded tokenizer).
    rope = json.loads(json.dumps(REAL_TEXT["rope_parameters"]))
    return Qwen3_5MoeTextConfig(
        **text_kwargs(
            vocab_size=g4.BENCH_VOCAB_SIZE,
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            max_position_embeddings=REAL_TEXT["max_position_embeddings"],
            rope_parameters=rope,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=256,
            num_experts=64,
            num_experts_per_tok=8,
            router_aux_loss_coef=0.001,
            output_router_logits=False,
        )
    )


def time_transformers(d, threads, runs=3):
    """The transformers timing of bench/transformers_bench.py, on the corpus's first 64 ids."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # as bench/transformers_bench.py runs it
    model = Qwen3_5MoeForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
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
        gated_delta_rule="torch (no flash-linear-attention): chunked torch_chunk_gated_delta_rule for the prefill, "
        "torch_recurrent_gated_delta_rule for decode",
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
        model = Qwen3_5MoeForCausalLM(cfg_bench()).float().eval()
        counts = randomize(model, BENCH_SEED, False, weight_std=BENCH_WEIGHT_STD)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(d)
        tok = g4.build_tokenizer(g4.BENCH_VOCAB_SIZE)
        g4.write_tokenizer_files(d, tok, model_max_length=4096)  # + generation_config.json
        print(f"wrote {d}: {n} parameters ({n * 4 / 1e9:.3f} GB f32), {dict(counts)}")
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
    ap.add_argument("--bench", metavar="DIR", help="write the ~0.54 B bench checkpoint to DIR and time transformers")
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
    prompt_ids = tok.encode(PROMPT_TEXT, add_special_tokens=True).ids
    assert len(prompt_ids) == 23, prompt_ids
    os.makedirs(OUT_ROOT, exist_ok=True)
    for name in args.only or list(VARIANTS):
        make_variant(name, VARIANTS[name], prompt_ids, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
