#!/usr/bin/env python3
"""Tiny random DeepSeek V4 checkpoints (plain, FP8/FP4-quantized) and the reference outputs.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/deepseek_v4_fixtures.py    # -> tests/fixtures/deepseek_v4/

For every variant in VARIANTS this script
  1. builds the variant's `DeepseekV4Config` (from a Hub-style config.json dict, or from transformers
     keyword arguments) and a `DeepseekV4ForCausalLM`, and randomises EVERY saved parameter and
     buffer: DeepseekV4RMSNorm weights = 1 + N(0, 0.2); attention sinks and the compressors'
     position_bias (`ape`) = N(0, 1); everything else (hyper-connection fn/base/scale, the hyper head,
     router weight and e_score_correction_bias included) = N(0, 0.2); each hash layer's `tid2eid` =
     for every token id, top_k DISTINCT random expert ids,
  2. rounds every tensor to what the file will store and writes a complete model folder (+ the
     tokenizer files of tests/fixtures/gemma4/e2b-like, vocab 512, and a generation_config.json):
       - bf16 variants: the f32 model is saved, re-loaded with `from_pretrained(dtype=bfloat16)` (which
         keeps `_keep_in_fp32_modules_strict` — hyper-connections, sinks, position_bias,
         e_score_correction_bias, norms — in float32) and saved again with `save_pretrained`, so
         model.safetensors holds exactly what transformers writes for a bf16 model (mixed BF16/F32),
       - Hub-form variants then replace config.json by the Hub form (see HUB_FLASH: `compress_ratios`
         with one trailing entry for the MTP layer, `num_hash_layers`, `qk_rope_head_dim`, top-level
         `rope_scaling` YaRN, `compress_rope_theta`, ...),
       - `fp8-fp4` is written by this script, not by save_pretrained, in the layout of the DeepSeek
         Hub checkpoints (tensor names of the conversion_mapping sources, `layers.{i}.attn.wq_a.weight`,
         `layers.{i}.ffn.experts.{e}.w1.weight`, ...): every nn.Linear that transformers' FP8 quantizer
         converts is F8_E4M3 with a `<module>.scale` (F8_E8M0, power-of-two) per 16 x 16 block — the
         name DeepSeek-V4-Flash uses; transformers renames `.scale` to `.weight_scale_inv` on load;
         routed experts are FP4 e2m1 packed two per I8 byte (low nibble = even column) with one
         F8_E8M0 scale per 32 values along K; everything in `_keep_in_fp32_modules` (compressor and
         indexer kv/gate projections, indexer weights_proj), lm_head, embeddings, norms, router and
         hyper-connection tensors stay unquantized (BF16, or F32 for the strict-fp32 ones). Its twin
         `fp8-fp4-dequantized` holds the same model with the dequantized weights in F32 (save_pretrained,
         no quantization_config); the reference outputs of both folders come from the twin,
     The weights that fp8-fp4 quantizes are first multiplied by a random power of two 2^{-2..1} per FP8
     block / FP4 group, so that their scales differ from block to block,
  3. reloads the folder with `from_pretrained` in float32 (so the reference is what the files say) and
     checks that the state dict equals the in-memory model,
  4. runs greedy `generate(use_cache=True)` from a 23-token prompt for 20 tokens (window 8, CSA rate 4,
     HCA rate 8: the decode closes compression windows of both kinds), then ONE full forward without a
     cache over the final 43 tokens, and records the logits, the generated ids, the reference's cache
     (as measure_cache.describe_cache walks it), the compressed entries per layer, router top-k gaps,
     SwiGLU clamp counts and indexer statistics,
  5. writes `reference.safetensors` (`logits` [43, 512] f32, row i predicts token i + 1; plus
     prompt_ids and generated_ids) + `reference.json`.

A variant's weight seed is the first seed >= its base seed whose greedy continuation has no EOS, is
varied (>= 12 distinct ids, no run longer than 3), has a top-1/top-2 logit margin >= MIN_MARGIN at
every greedy decision, whose router picks are unambiguous (on every routed, non-hash layer the k-th
and (k+1)-th selection scores — score_fn(logits) + e_score_correction_bias — differ by >=
MIN_ROUTER_GAP at every token of the full forward), where the SwiGLU clamp (swiglu_limit) actually
cuts some routed-expert pre-activations, and whose generated ids are the full forward's argmax.

Every variant is asserted self-consistent: each cached greedy step's logits, and each forward (no
cache) over a prefix prompt .. T-1, equal the full forward's rows within 1e-4. For the other
variants index_topk (16) >= the number of compressed CSA entries (10 at 43 tokens), so the indexer
keeps everything causal. `indexer-drops` (index_topk 2) drops entries; its reference is only
self-consistent when no query's top-k boundary is a tie: `torch.topk` orders tied index scores
(typically exactly 0.0, when every head's ReLU(q . k) is 0) differently for different row shapes,
so cached decode, full forward and prefix forwards can then keep different entries. Its seed is
therefore also required to have, at every query of the full forward that has more causal entries
than index_topk, a gap >= MIN_INDEX_GAP between the k-th and (k+1)-th index score (no tie), and
reference.json records the drop count and the smallest boundary gap.

FP8 check: transformers 5.23.0 does not load the quantized folder on this CPU-only environment as
installed: FineGrainedFP8HfQuantizer.validate_environment raises ImportError because `accelerate` is
not installed (checked first, even with dequantize=True). The script repeats the load with only that
availability check patched to True (the load then succeeds without accelerate) and
`FineGrainedFP8Config(dequantize=True)`: no missing / unexpected keys, and every tensor equals the
twin's. With dtype=float32 the tensors stored as BF16 (embed, head, router, compressor / indexer
projections) stay BF16 (e.g. the router weight goes through the Fp8Dequantize converter, which returns
a weight that has no scale unchanged, and get_new_dtype skips the cast for such converters), so that
model's forward fails on a dtype mismatch; after `model.float()` its logits equal the twin's exactly
(asserted). reference.json of fp8-fp4 records all of it.

Deterministic: fixed seeds, CPU, torch.set_num_threads(1), torch.use_deterministic_algorithms(True);
two runs give byte-identical files. See tests/oracle/README.md ("DeepSeek V4 model fixtures").
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
from collections import OrderedDict

import safetensors.torch
import torch
import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import FineGrainedFP8Config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402
import gemma4_fixtures as g4  # noqa: E402  (pinned versions, tokenizer ids, generation helpers)
from measure_cache import describe_cache  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures", "deepseek_v4")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4", "e2b-like")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# 23 ids with BOS: the prefill leaves 3 tokens in the CSA buffer and 7 in the HCA buffer, so the
# very first decode step closes a window of both kinds; 23 + 20 = 43 tokens in all.
PROMPT_TEXT = "The robot and the boat ☕ on the river saw the light of a star"
MAX_NEW_TOKENS = 20
MIN_ROUTER_GAP = 1e-3
MIN_INDEX_GAP = 1e-3  # indexer-drops: k-th minus (k+1)-th index score among the causal entries
MAX_SEED_TRIES = 300
STEP_TOLERANCE = 1e-4  # cached greedy step logits vs full-forward rows (self-consistent variants)
SINK_STD = 1.0  # attention sinks and compressor position_bias: large enough to matter
FP8_BLOCK = 16
FP4_GROUP = 32

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
SHORT = {S: "S", C: "CSA", H: "HCA"}

# DeepSeek-V4-Flash's config.json (the Hub form, transformers_version 4.57.1), verbatim except
# quantization_config, which the variants set themselves. The variants override the sizes.
HUB_FLASH = OrderedDict(
    [
        ("architectures", ["DeepseekV4ForCausalLM"]),
        ("attention_bias", False),
        ("attention_dropout", 0.0),
        ("bos_token_id", 0),
        ("eos_token_id", 1),
        ("hc_eps", 1e-06),
        ("hc_mult", 4),
        ("hc_sinkhorn_iters", 20),
        ("head_dim", 512),
        ("hidden_act", "silu"),
        ("hidden_size", 4096),
        ("index_head_dim", 128),
        ("index_n_heads", 64),
        ("index_topk", 512),
        ("initializer_range", 0.02),
        ("max_position_embeddings", 1048576),
        ("model_type", "deepseek_v4"),
        ("moe_intermediate_size", 2048),
        ("n_routed_experts", 256),
        ("n_shared_experts", 1),
        ("norm_topk_prob", True),
        ("num_attention_heads", 64),
        ("num_experts_per_tok", 6),
        ("num_hidden_layers", 43),
        ("num_hash_layers", 3),
        ("num_key_value_heads", 1),
        ("num_nextn_predict_layers", 1),
        ("o_groups", 8),
        ("o_lora_rank", 1024),
        ("q_lora_rank", 1024),
        ("qk_rope_head_dim", 64),
        ("rms_norm_eps", 1e-06),
        (
            "rope_scaling",
            OrderedDict(
                [("beta_fast", 32), ("beta_slow", 1), ("factor", 16), ("original_max_position_embeddings", 65536), ("type", "yarn")]
            ),
        ),
        ("rope_theta", 10000),
        ("routed_scaling_factor", 1.5),
        ("scoring_func", "sqrtsoftplus"),
        ("sliding_window", 128),
        ("swiglu_limit", 10.0),
        ("tie_word_embeddings", False),
        ("topk_method", "noaux_tc"),
        ("torch_dtype", "bfloat16"),
        ("transformers_version", "4.57.1"),
        ("use_cache", True),
        ("vocab_size", 129280),
        ("compress_rope_theta", 160000),
        ("compress_ratios", [0, 0] + [4, 128] * 20 + [4, 0]),
    ]
)

# Tiny sizes shared by all variants.
TINY = OrderedDict(
    vocab_size=g4.VOCAB_SIZE,
    hidden_size=32,
    num_attention_heads=4,
    head_dim=32,
    q_lora_rank=16,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=4,
    index_head_dim=16,
    sliding_window=8,
    num_experts_per_tok=2,
)

RATIO_OF = {S: 0, C: 4, H: 128}  # the Hub's compress_ratios codes (transformers maps only 0/4/128)


def hub_config(layers, num_hash_layers, **overrides):
    """A Hub-form config.json dict: Flash's keys with tiny sizes. `compress_ratios` lists the Hub codes
    (0 / 4 / 128) per layer plus one trailing 0 for the MTP layer; the tiny rates (CSA 4, HCA 8) come from
    the legacy top-level `compress_rate_csa` / `compress_rate_hca` keys, because transformers 5.23.0 maps
    only the codes 0, 4 and 128 to layer types (a literal 8 raises KeyError) and takes every rate from
    `compress_rates` (default 4 / 128) — never from the `compress_ratios` values."""
    cfg = copy.deepcopy(HUB_FLASH)
    cfg.update(TINY)
    cfg.update(
        bos_token_id=g4.BOS_ID,
        eos_token_id=g4.EOS_ID,
        num_hidden_layers=len(layers),
        num_hash_layers=num_hash_layers,
        qk_rope_head_dim=8,
        compress_ratios=[RATIO_OF[t] for t in layers] + [0],
        compress_rate_csa=4,
        compress_rate_hca=8,
        max_position_embeddings=256,
        rope_scaling=OrderedDict(
            [("beta_fast", 32), ("beta_slow", 1), ("factor", 16), ("original_max_position_embeddings", 16), ("type", "yarn")]
        ),
    )
    cfg.update(overrides)
    return cfg


def cfg_flash_like():
    # Flash in miniature: two sliding layers, then CSA / HCA alternating, ending on CSA; the first two
    # layers hash-routed; 8 experts top-2, sqrtsoftplus x1.5, swiglu_limit 1 (clamps), hc_mult 4, 20
    # Sinkhorn iterations, YaRN x16 from 16 positions on the compressed layers only.
    return hub_config(
        [S, S, C, H, C],
        2,
        n_routed_experts=8,
        moe_intermediate_size=16,
        index_topk=16,
        swiglu_limit=1.0,
    )


def cfg_indexer_drops():
    # Flash-like with index_topk 2: the Lightning Indexer keeps 2 of up to 10 compressed CSA entries.
    return hub_config(
        [S, C, C],
        1,
        n_routed_experts=8,
        moe_intermediate_size=16,
        index_topk=2,
        swiglu_limit=1.0,
    )


def cfg_fp8():
    # The quantized Hub checkpoint: same form as Flash (hc_mult 2 to keep the f32 twin small), 4 experts
    # x 64 (FP4 groups: 1 per row for w1/w3 with K = hidden = 32, 2 per row for w2 with K = 64), FP8
    # blocks 16 x 16.
    cfg = hub_config(
        [S, C, H],
        1,
        hc_mult=2,
        n_routed_experts=4,
        moe_intermediate_size=64,
        index_topk=16,
        swiglu_limit=2.0,
    )
    cfg["quantization_config"] = OrderedDict(
        [
            ("activation_scheme", "dynamic"),
            ("expert_dtype", "fp4"),
            ("fmt", "e4m3"),
            ("quant_method", "fp8"),
            ("scale_fmt", "ue8m0"),
            ("weight_block_size", [FP8_BLOCK, FP8_BLOCK]),
        ]
    )
    return cfg


def cfg_transformers_form():
    # The transformers form (what save_pretrained writes): layer_types starting on a compressed layer,
    # compress_rates dict, mlp_layer_types with hash layers in the middle, nested rope_parameters
    # {main, compress} — main: default theta 5000; compress: YaRN x4 from 16 positions, theta 80000,
    # beta 8/1, NO attention_factor (so the reference scales cos/sin by 0.1 ln 4 + 1; the Hub form
    # forces 1.0) — hc_mult 2 with 7 Sinkhorn iterations and hc_eps 1e-3, sigmoid scoring, routed x2,
    # norm_topk_prob false (the reference normalises the top-k weights anyway), swiglu_limit 3, tied
    # embeddings, rms_norm_eps 1e-5.
    return dict(
        TINY,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_key_value_heads=1,
        partial_rotary_factor=0.25,
        n_routed_experts=8,
        n_shared_experts=1,
        scoring_func="sigmoid",
        norm_topk_prob=False,
        routed_scaling_factor=2.0,
        layer_types=[C, H, S, C],
        compress_rates={C: 4, H: 8},
        mlp_layer_types=["moe", "hash_moe", "hash_moe", "moe"],
        hc_mult=2,
        hc_sinkhorn_iters=7,
        hc_eps=1e-3,
        index_topk=16,
        swiglu_limit=3.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.25},
            "compress": {
                "rope_type": "yarn",
                "rope_theta": 80000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 8.0,
                "beta_slow": 1.0,
                "partial_rotary_factor": 0.25,
            },
        },
        tie_word_embeddings=True,
        bos_token_id=g4.BOS_ID,
        eos_token_id=g4.EOS_IDS,
        pad_token_id=g4.PAD_ID,
    )


VARIANTS = OrderedDict(
    [
        (
            "flash-like",
            dict(
                form="hub",
                config=cfg_flash_like,
                seed=100,
                clamp=True,
                covers="Hub-form config.json as DeepSeek-V4-Flash ships it (compress_ratios [0,0,4,128,4] + MTP 0, "
                "num_hash_layers 2, qk_rope_head_dim 8, top-level rope_scaling YaRN x16 from 16 positions, "
                "compress_rope_theta 160000, sqrtsoftplus x1.5, swiglu_limit 1) with compress_rate_hca 8; layers "
                "S S CSA HCA CSA; hc_mult 4; 8 experts top-2 + shared expert; index_topk 16 >= every CSA entry count; "
                "files as save_pretrained writes a bf16 model (BF16 + F32 strict-fp32 tensors)",
            ),
        ),
        (
            "transformers-form",
            dict(
                form="transformers",
                config=cfg_transformers_form,
                seed=200,
                clamp=True,
                covers="transformers-form config.json (layer_types CSA HCA S CSA, compress_rates {4, 8}, mlp_layer_types "
                "moe hash hash moe, nested rope_parameters main default theta 5000 / compress YaRN x4 theta 80000 "
                "WITHOUT attention_factor (cos/sin scaled by 0.1 ln 4 + 1), partial_rotary_factor 0.25), hc_mult 2, "
                "hc_sinkhorn_iters 7, hc_eps 1e-3, sigmoid scoring x2, norm_topk_prob false (ignored by the reference), "
                "swiglu_limit 3, tied embeddings, rms_norm_eps 1e-5; files as save_pretrained writes a bf16 model",
            ),
        ),
        (
            "indexer-drops",
            dict(
                form="hub",
                config=cfg_indexer_drops,
                seed=300,
                drops=True,
                clamp=True,
                covers="Hub form like flash-like but index_topk 2 (the indexer drops compressed CSA entries); layers "
                "S CSA CSA, num_hash_layers 1; seed chosen so that no top-k boundary is a tie (index-score gap >= "
                "MIN_INDEX_GAP at every dropping query), which makes this reference self-consistent, see indexer",
            ),
        ),
        (
            "indexer-ties",
            dict(
                form="hub",
                config=cfg_indexer_drops,
                seed=300,
                drops=True,
                ties=True,
                definition=True,
                clamp=True,
                covers="indexer-drops' config with a seed whose index scores TIE at the top-k boundary (exact 0.0 "
                "ReLU scores). The unpatched reference is not self-consistent there (torch.topk breaks ties in an "
                "order that depends on the row length); the outputs here are the reference's with the selection "
                "by definition: Tensor.topk replaced by a stable descending sort (ties to the lower index, -0.0 == "
                "0.0), see definition_topk. What the unpatched reference gives is recorded under "
                "reference_without_definition",
            ),
        ),
        (
            "fp8-fp4",
            dict(
                form="hub",
                config=cfg_fp8,
                seed=400,
                clamp=True,
                quantized=True,
                covers="Hub-form quantized checkpoint as DeepSeek ships it: quantization_config fp8 e4m3 dynamic ue8m0 "
                "blocks [16, 16] expert_dtype fp4; Hub tensor names; dense linears F8_E4M3 + .scale F8_E8M0 per 16x16 "
                "block, routed experts FP4 e2m1 packed in I8 (low nibble = even column) + .scale F8_E8M0 per 32 "
                "along K, the rest BF16 / F32; layers S CSA HCA, 4 experts x 64, hc_mult 2; reference outputs "
                "from the dequantized twin fp8-fp4-dequantized",
            ),
        ),
    ]
)


# --------------------------------------------------------------------------------------
# Config objects
# --------------------------------------------------------------------------------------


def make_config(spec):
    raw = spec["config"]()
    if spec["form"] == "hub":
        d = json.loads(json.dumps(raw))
        d.pop("quantization_config", None)
        d.pop("torch_dtype", None)
        cfg = DeepseekV4Config.from_dict(d)
    else:
        cfg = DeepseekV4Config(**json.loads(json.dumps(raw)))
    return raw, cfg


def config_summary(cfg):
    return OrderedDict(
        layer_types=[SHORT[t] for t in cfg.layer_types],
        mlp_layer_types=list(cfg.mlp_layer_types),
        compress_rates=dict(cfg.compress_rates),
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        index_topk=cfg.index_topk,
        swiglu_limit=cfg.swiglu_limit,
        scoring_func=cfg.scoring_func,
        routed_scaling_factor=cfg.routed_scaling_factor,
        n_routed_experts=cfg.n_routed_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        rope_parameters=json.loads(json.dumps(cfg.rope_parameters)),
    )


# --------------------------------------------------------------------------------------
# Randomisation
# --------------------------------------------------------------------------------------


def norm_names(model):
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, mdl.DeepseekV4RMSNorm)}


@torch.no_grad()
def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    norms = norm_names(model)
    sd = model.state_dict()
    seen = set()
    counts = {"norm": 0, "sink_bias": 0, "tid2eid": 0, "weight": 0}
    for name in sorted(sd):
        t = sd[name]
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied lm_head -> embed_tokens
            continue
        seen.add(ptr)
        if name.endswith("tid2eid"):
            vocab, k = t.shape
            num_experts = model.config.n_routed_experts
            rows = [torch.randperm(num_experts, generator=g)[:k] for _ in range(vocab)]
            t.copy_(torch.stack(rows).to(t.dtype))
            counts["tid2eid"] += 1
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name in norms:
            t.copy_((1.0 + g4.SCALE_STD * noise).to(t.dtype))
            counts["norm"] += 1
        elif name.endswith((".sinks", ".position_bias")):
            t.copy_((SINK_STD * noise).to(t.dtype))
            counts["sink_bias"] += 1
        else:
            t.copy_((g4.WEIGHT_STD * noise).to(t.dtype))
            counts["weight"] += 1
    for name, t in model.state_dict().items():
        flat = t.float().flatten()
        if flat.numel() > 1:
            assert flat.std() > 0, f"{name} is constant"
        else:
            assert float(flat[0]) not in (0.0, 1.0), f"{name} kept its init value"
    return counts


_STORAGE_PLAN = {}


def storage_plan(model, key):
    """{state-dict name: dtype} that `from_pretrained(dtype=bfloat16)` gives this architecture (strict
    fp32 modules stay float32). Found once per variant by a real save / load round trip."""
    if key not in _STORAGE_PLAN:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            m16 = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
            _STORAGE_PLAN[key] = {k: v.dtype for k, v in m16.state_dict().items()}
    return _STORAGE_PLAN[key]


@torch.no_grad()
def round_to_bf16_storage(model, key):
    plan = storage_plan(model, key)
    for name, t in model.state_dict().items():
        if plan[name] == torch.bfloat16 and t.is_floating_point():
            t.copy_(t.to(torch.bfloat16).float())


# --------------------------------------------------------------------------------------
# FP8 / FP4
# --------------------------------------------------------------------------------------


class _Quantizer:
    """The minimum of an HfQuantizer that transformers' Fp8Quantize / Fp8Dequantize read."""

    def __init__(self):
        self.quantization_config = FineGrainedFP8Config(
            weight_block_size=(FP8_BLOCK, FP8_BLOCK), scale_fmt="ue8m0", expert_dtype="fp4"
        )


def fp8_quantize(w):
    """transformers' own Fp8Quantize (ue8m0: power-of-two weight_scale_inv per block)."""
    out = Fp8Quantize(_Quantizer())._quantize_one("w.weight", w.float())
    q, s = out["w.weight"], out["w.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu, (q.dtype, s.dtype)
    assert s.shape == (w.shape[0] // FP8_BLOCK, w.shape[1] // FP8_BLOCK), (w.shape, s.shape)
    return q, s


FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp4_quantize(w):
    """e2m1 with one ue8m0 scale per FP4_GROUP values along K: scale = 2^ceil(log2(amax / 6)), code =
    nearest magnitude (ties to the smaller) + 8 if negative; two codes per byte, even column in the low
    nibble (what Fp8Dequantize._unpack_fp4 reads)."""
    n, k = w.shape
    assert k % FP4_GROUP == 0, w.shape
    grp = w.float().reshape(n, k // FP4_GROUP, FP4_GROUP)
    amax = grp.abs().amax(-1)
    scale = torch.pow(2.0, torch.ceil(torch.log2(torch.where(amax > 0, amax / 6.0, torch.ones_like(amax)))))
    x = grp / scale[..., None]
    assert float(x.abs().max()) <= 6.0
    idx = (x.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(-1)
    code = (idx + 8 * (x < 0).long()).reshape(n, k)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)


def dequantize(q, s):
    """transformers' own Fp8Dequantize (unpacks FP4 for int8 weights), to float32."""
    return Fp8Dequantize(_Quantizer())._dequantize_one(q, s, output_dtype=torch.float32)


def quantized_linear_modules(model):
    """Names of the nn.Linear / grouped-linear modules that transformers' FP8 quantizer converts
    (same skip list as FineGrainedFP8HfQuantizer._process_model_before_weight_loading)."""
    skip = list(set(get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules)))
    names = []
    for name, mod in model.named_modules():
        if not should_convert_module(name, skip):
            continue
        if type(mod) is torch.nn.Linear or isinstance(mod, mdl.DeepseekV4GroupedLinear):
            names.append(name)
    return names, sorted(skip)


# transformers state-dict name -> Hub name (the sources of conversion_mapping["deepseek_v4"]).
ATTN_RENAMES = [
    ("compressor.indexer.kv_proj.", "indexer.compressor.wkv."),
    ("compressor.indexer.gate_proj.", "indexer.compressor.wgate."),
    ("compressor.indexer.position_bias", "indexer.compressor.ape"),
    ("compressor.indexer.kv_norm.", "indexer.compressor.norm."),
    ("compressor.indexer.q_b_proj.", "indexer.wq_b."),
    ("compressor.indexer.scorer.weights_proj.", "indexer.weights_proj."),
    ("compressor.kv_proj.", "compressor.wkv."),
    ("compressor.gate_proj.", "compressor.wgate."),
    ("compressor.position_bias", "compressor.ape"),
    ("compressor.kv_norm.", "compressor.norm."),
    ("q_a_proj.", "wq_a."),
    ("q_a_norm.", "q_norm."),
    ("q_b_proj.", "wq_b."),
    ("kv_proj.", "wkv."),
    ("kv_norm.", "kv_norm."),
    ("o_a_proj.", "wo_a."),
    ("o_b_proj.", "wo_b."),
    ("sinks", "attn_sink"),
]
LAYER_RENAMES = [
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
    ("attn_hc.fn", "hc_attn_fn"),
    ("attn_hc.base", "hc_attn_base"),
    ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"),
    ("ffn_hc.base", "hc_ffn_base"),
    ("ffn_hc.scale", "hc_ffn_scale"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.", "ffn.gate."),
    ("mlp.shared_experts.gate_proj.", "ffn.shared_experts.w1."),
    ("mlp.shared_experts.down_proj.", "ffn.shared_experts.w2."),
    ("mlp.shared_experts.up_proj.", "ffn.shared_experts.w3."),
]
TOP_RENAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def hub_name(name):
    if name in TOP_RENAMES:
        return TOP_RENAMES[name]
    assert name.startswith("model.layers."), name
    i, rest = name[len("model.layers.") :].split(".", 1)
    if rest.startswith("self_attn."):
        rest = rest[len("self_attn.") :]
        for a, b in ATTN_RENAMES:
            if rest.startswith(a):
                return f"layers.{i}.attn.{b}{rest[len(a):]}"
        raise KeyError(name)
    for a, b in LAYER_RENAMES:
        if rest.startswith(a):
            return f"layers.{i}.{b}{rest[len(a):]}"
    raise KeyError(name)


def block_factors(shape, block, g):
    """A random power of two 2^{-2..1} per (block[0] x block[1]) block, expanded to `shape`, so that the
    quantization scales differ from block to block."""
    n, k = shape
    f = torch.pow(2.0, torch.randint(-2, 2, (n // block[0], k // block[1]), generator=g).float())
    return f.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


@torch.no_grad()
def quantize_model(model, storage, seed):
    """Quantize `model` in place to what the Hub checkpoint stores (weights become their dequantized
    values) and return the Hub-named tensors of the quantized file. Before quantizing, every quantized
    weight is multiplied by block_factors (per FP8 block / per FP4 group)."""
    g = torch.Generator().manual_seed(seed + 1)
    linear_names, skip = quantized_linear_modules(model)
    linear_weights = {f"{n}.weight" for n in linear_names}
    sd = model.state_dict()
    hub = OrderedDict()
    kinds = {"fp8": [], "fp4": [], "unquantized": []}
    for name in sorted(sd):
        t = sd[name]
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 2)[0]  # model.layers.i.mlp
            i = prefix.split(".")[2]
            inter = model.config.moe_intermediate_size
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    parts = [("w1", t[e, :inter]), ("w3", t[e, inter:])]
                else:
                    parts = [("w2", t[e])]
                deq = []
                for w, val in parts:
                    q, s = fp4_quantize(val * block_factors(val.shape, (1, FP4_GROUP), g))
                    base = f"layers.{i}.ffn.experts.{e}.{w}"
                    hub[f"{base}.weight"], hub[f"{base}.scale"] = q, s
                    deq.append(dequantize(q, s))
                    kinds["fp4"].append(f"{base}.weight")
                t[e].copy_(torch.cat(deq, 0))
            continue
        hname = hub_name(name)
        if name in linear_weights:
            q, s = fp8_quantize(t * block_factors(t.shape, (FP8_BLOCK, FP8_BLOCK), g))
            hub[hname] = q
            hub[hname.removesuffix(".weight") + ".scale"] = s
            t.copy_(dequantize(q, s))
            kinds["fp8"].append(hname)
        else:
            dtype = storage[name] if t.is_floating_point() else t.dtype
            hub[hname] = t.to(dtype).clone()
            t.copy_(hub[hname].to(t.dtype))
            kinds["unquantized"].append(hname)
    return hub, kinds, linear_names, skip


def check_fp8_layout(cfg_dict, hub):
    """The shapes / dtypes of the quantized file against the parameters transformers' FP8 modules
    allocate for it (replace_with_fp8_linear on the meta device, dequantize=False)."""
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    d = json.loads(json.dumps(cfg_dict))
    qc = FineGrainedFP8Config(**{k: v for k, v in d.pop("quantization_config").items() if k not in ("fmt",)})
    d.pop("torch_dtype", None)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(DeepseekV4Config.from_dict(d))
    skip = list(set(get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules)))
    replace_with_fp8_linear(model, modules_to_not_convert=skip, quantization_config=qc, pre_quantized=True)
    checked = 0
    for name, p in model.state_dict().items():
        if name.endswith("_scale_inv") and ".mlp.experts." in name:  # FP8Experts: fused per-expert tensors
            base = name.removesuffix("_scale_inv")
            i = base.split(".")[2]
            for e in range(p.shape[0]):
                if base.endswith("gate_up_proj"):
                    w1, w3 = hub[f"layers.{i}.ffn.experts.{e}.w1.weight"], hub[f"layers.{i}.ffn.experts.{e}.w3.weight"]
                    s1, s3 = hub[f"layers.{i}.ffn.experts.{e}.w1.scale"], hub[f"layers.{i}.ffn.experts.{e}.w3.scale"]
                    w, s = torch.cat([w1, w3]), torch.cat([s1, s3])
                else:
                    w = hub[f"layers.{i}.ffn.experts.{e}.w2.weight"]
                    s = hub[f"layers.{i}.ffn.experts.{e}.w2.scale"]
                wp = model.state_dict()[base]
                assert (tuple(w.shape), w.dtype) == (tuple(wp.shape[1:]), wp.dtype), (name, w.shape, wp.shape)
                assert (tuple(s.shape), s.dtype) == (tuple(p.shape[1:]), p.dtype), (name, s.shape, p.shape)
                checked += 1
        elif name.endswith("weight_scale_inv"):
            hname = hub_name(name.removesuffix("_scale_inv"))
            w, s = hub[hname], hub[hname.removesuffix(".weight") + ".scale"]
            wp = model.state_dict()[name.removesuffix("_scale_inv")]
            assert (tuple(w.shape), w.dtype) == (tuple(wp.shape), wp.dtype), (name, w.shape, wp.shape, w.dtype, wp.dtype)
            assert (tuple(s.shape), s.dtype) == (tuple(p.shape), p.dtype), (name, s.shape, p.shape)
            checked += 1
    return checked


def transformers_fp8_load(d, twin_sd, sequence, twin_logits):
    """Load the quantized folder with transformers (dequantize=True) and compare with the twin."""
    from transformers.quantizers import quantizer_finegrained_fp8 as qmod

    def load(dtype):
        return DeepseekV4ForCausalLM.from_pretrained(
            d, dtype=dtype, quantization_config=FineGrainedFP8Config(dequantize=True), output_loading_info=True
        )

    result = OrderedDict()
    try:
        load(torch.float32)
        result["as_installed"] = "loaded"
    except ImportError as e:
        result["as_installed"] = f"ImportError: {str(e).splitlines()[0]}"
    saved = qmod.is_accelerate_available
    qmod.is_accelerate_available = lambda: True  # the only use of accelerate on this path is this check
    try:
        m, info = load(torch.float32)
        m16, info16 = load(torch.bfloat16)
    finally:
        qmod.is_accelerate_available = saved
    for inf in (info, info16):
        problems = {k: v for k, v in inf.items() if v}
        assert not problems, f"fp8 load: {problems}"
    diff = g4.state_dicts_equal(twin_sd, m.state_dict())
    assert not diff, f"fp8 load differs from the twin: {diff[:5]}"
    left_bf16 = sorted({n.split(".", 3)[-1] if n.startswith("model.layers.") else n
                        for n, p in m.state_dict().items() if p.dtype == torch.bfloat16})
    with torch.no_grad():
        try:
            m(input_ids=sequence[None], use_cache=False)
            f32_forward = "runs"
        except RuntimeError as e:
            f32_forward = f"RuntimeError: {str(e).splitlines()[0]}"
        logits = m.float()(input_ids=sequence[None], use_cache=False).logits[0].float()
        logits16 = m16(input_ids=sequence[None], use_cache=False).logits[0].float()
    max_diff = float((logits - twin_logits).abs().max())
    assert max_diff == 0.0, max_diff
    result["accelerate_check_patched"] = (
        "loads with FineGrainedFP8Config(dequantize=True) on CPU: no missing / unexpected keys; every value equals "
        "the twin's"
    )
    result["dtype_float32"] = OrderedDict(
        tensors_left_bfloat16=left_bf16,
        forward=f32_forward,
        after_model_float_logits_max_abs_diff_vs_twin=max_diff,
    )
    result["dtype_bfloat16"] = OrderedDict(
        forward="runs", logits_max_abs_diff_vs_twin=float(f"{float((logits16 - twin_logits).abs().max()):.3g}")
    )
    return result


# --------------------------------------------------------------------------------------
# Probes over one full forward
# --------------------------------------------------------------------------------------


@torch.no_grad()
def prefix_max_abs_diff(model, seq, p, full):
    """Forwards (no cache) over every prefix from the prompt up: their rows must equal the full forward's."""
    worst = 0.0
    for n in range(p, len(seq)):
        logits = model(input_ids=seq[None, :n], use_cache=False).logits[0].float()
        worst = max(worst, float((logits - full[:n]).abs().max()))
    return worst


@torch.no_grad()
def probe_forward(model, seq):
    """One full forward (no cache) with hooks: router top-k gaps on the routed layers, SwiGLU clamp counts,
    Lightning-Indexer statistics (per query: valid = causal entries; drops when valid > index_topk)."""
    cfg = model.config
    limit = cfg.swiglu_limit
    stats = OrderedDict(
        router_gap=float("inf"),
        routed_gate_clamped=0,
        routed_up_clamped=0,
        routed_values=0,
        shared_gate_clamped=0,
        shared_up_clamped=0,
        shared_values=0,
    )
    idx = OrderedDict(queries_with_drops=0, min_boundary_gap=None, boundary_ties=0, boundary_zero_ties=0)
    hooks = []

    def router_hook(mod, args, out):
        scores = mod.score_fn(out[0].float()) + mod.e_score_correction_bias.float()
        top = torch.topk(scores, mod.top_k + 1, dim=-1).values
        stats["router_gap"] = min(stats["router_gap"], float((top[:, mod.top_k - 1] - top[:, mod.top_k]).min()))

    def scorer_hook(mod, args, out):
        scores = out[0]  # [S, T]
        rate = cfg.compress_rates[C]
        k = cfg.index_topk
        for t in range(scores.shape[0]):
            valid = (t + 1) // rate
            if valid <= k:
                continue
            idx["queries_with_drops"] += 1
            top = torch.sort(scores[t, :valid], descending=True).values
            gap = float(top[k - 1] - top[k])
            idx["min_boundary_gap"] = gap if idx["min_boundary_gap"] is None else min(idx["min_boundary_gap"], gap)
            if gap == 0.0:
                idx["boundary_ties"] += 1
                if float(top[k]) == 0.0:
                    idx["boundary_zero_ties"] += 1

    def shared_gate_hook(mod, args, out):
        stats["shared_gate_clamped"] += int((out > limit).sum())
        stats["shared_values"] += out.numel()

    def shared_up_hook(mod, args, out):
        stats["shared_up_clamped"] += int((out.abs() > limit).sum())

    original = mdl.DeepseekV4Experts._apply_gate

    def counting_apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        stats["routed_gate_clamped"] += int((gate > self.limit).sum())
        stats["routed_up_clamped"] += int((up.abs() > self.limit).sum())
        stats["routed_values"] += gate.numel()
        return original(self, gate_up)

    for m in model.modules():
        if isinstance(m, mdl.DeepseekV4TopKRouter):
            hooks.append(m.register_forward_hook(router_hook))
        elif isinstance(m, mdl.DeepseekV4IndexerScorer):
            hooks.append(m.register_forward_hook(scorer_hook))
        elif isinstance(m, mdl.DeepseekV4MLP):
            hooks.append(m.gate_proj.register_forward_hook(shared_gate_hook))
            hooks.append(m.up_proj.register_forward_hook(shared_up_hook))
    mdl.DeepseekV4Experts._apply_gate = counting_apply_gate
    try:
        model(input_ids=seq[None], use_cache=False)
    finally:
        mdl.DeepseekV4Experts._apply_gate = original
        for h in hooks:
            h.remove()
    stats["indexer"] = idx
    return stats


def acceptable(run, probe, spec):
    gen = run["generated"]
    ok = (
        run["finite"]
        and len(gen) == MAX_NEW_TOKENS
        and not (set(gen) & set(g4.EOS_IDS))
        and run["decision_margin"] >= g4.MIN_MARGIN
        and len(set(gen)) >= g4.MIN_DISTINCT
        and g4.longest_run(gen) <= g4.MAX_RUN
        and probe["router_gap"] >= MIN_ROUTER_GAP
    )
    if spec.get("clamp"):
        ok = ok and probe["routed_gate_clamped"] + probe["routed_up_clamped"] > 0
    ok = ok and not run["mismatch"]
    if spec.get("drops"):
        idx = probe["indexer"]
        ok = ok and idx["queries_with_drops"] > 0
        if spec.get("ties"):
            ok = ok and idx["boundary_zero_ties"] > 0
        else:
            ok = ok and idx["boundary_ties"] == 0 and idx["min_boundary_gap"] >= MIN_INDEX_GAP
    return ok


_TORCH_TOPK = torch.Tensor.topk


def _stable_topk(self, k, dim=-1, largest=True, sorted=True):
    assert largest, "only the largest-k selection is replaced"
    s = torch.sort(self, dim=dim, descending=True, stable=True)
    return torch.return_types.topk((s.values.narrow(dim, 0, k), s.indices.narrow(dim, 0, k)))


@contextlib.contextmanager
def definition_topk(enabled):
    """The indexer's selection by definition: each query takes the top index_topk of the compressed entries
    complete before it, ties to the lower index. DeepseekV4Indexer.forward (modeling_deepseek_v4.py) selects with
    `index_scores.topk(top_k)` over all entries (future ones masked to -inf), and torch.topk's order among equal
    scores depends on the row length, which differs between a full forward, a prefix forward and cached decoding.
    While enabled, Tensor.topk is a stable descending sort (torch.sort treats -0.0 == 0.0); the routers call
    torch.topk, not the method, and are unaffected."""
    if enabled:
        torch.Tensor.topk = _stable_topk
    try:
        yield
    finally:
        torch.Tensor.topk = _TORCH_TOPK


@contextlib.contextmanager
def unpatched_topk():
    saved = torch.Tensor.topk
    torch.Tensor.topk = _TORCH_TOPK
    try:
        yield
    finally:
        torch.Tensor.topk = saved


@torch.no_grad()
def reference_run(model, prompt_ids):
    """gemma4_fixtures.reference_run, plus the cached step logits and the margins of both paths."""
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
        step_logits=step,
        cache=out.past_key_values,
        step_max_abs_diff=float((step - full_at_steps).abs().max()),
        mismatch=mismatch,
        decision_margin=float(g4.top2_margins(step).min()),  # the greedy decisions were taken on these
        full_margin=float(g4.top2_margins(full_at_steps).min()),
        finite=bool(torch.isfinite(full).all() and torch.isfinite(step).all()),
    )


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_common_files(d):
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(d, f))
    write_json(os.path.join(d, "generation_config.json"), g4.generation_config())


def fresh_dir(name):
    d = os.path.join(OUT_ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


def save_bf16(model, d):
    """What save_pretrained writes for this model loaded in bfloat16 (values are already rounded)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        m16 = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
        m16.save_pretrained(d)


def file_layout(path):
    """{tensor name: [dtype, shape]} of a safetensors file, from its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return OrderedDict((k, [v["dtype"], v["shape"]]) for k, v in sorted(header.items()))


def layout_examples(layout):
    """A few names per kind, for reference.json."""
    out = OrderedDict()
    for name, (dtype, shape) in layout.items():
        key = dtype
        out.setdefault(key, [])
        if len(out[key]) < 6:
            out[key].append(f"{name} {shape}")
    return out


def compressed_entries(cache, cfg, full_tokens):
    rows = []
    for i, t in enumerate(cfg.layer_types):
        if t == S:
            continue
        layer = cache.layers[i]
        buf = layer.buffer_kv["compressor"]
        rows.append(
            OrderedDict(
                layer=i,
                type=SHORT[t],
                rate=cfg.compress_rates[t],
                full_forward=full_tokens // cfg.compress_rates[t],
                cache=layer.entry_count["compressor"],
                cache_buffer=0 if buf is None else int(buf.shape[1]),
            )
        )
    return rows


def make_variant(name, spec, prompt_ids, quiet=False):
    quantized = spec.get("quantized", False)
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        raw, cfg = make_config(spec)
        torch.manual_seed(seed)
        model = DeepseekV4ForCausalLM(cfg).eval()
        counts = randomize(model, seed)
        if quantized:
            storage = storage_plan(model, name)
            hub, kinds, linear_names, skip = quantize_model(model, storage, seed)
        else:
            round_to_bf16_storage(model, name)
        run = reference_run(model, prompt_ids)
        probe = probe_forward(model, run["sequence"])
        if acceptable(run, probe, spec):
            break
    else:
        raise SystemExit(f"{name}: no seed in {MAX_SEED_TRIES} tries gives an acceptable greedy run")
    in_memory = {k: v.clone() for k, v in model.state_dict().items()}

    # Write the folder(s).
    d = fresh_dir(name)
    twin = None
    fp8_info = None
    if quantized:
        twin = fresh_dir(name + "-dequantized")
        model.save_pretrained(twin)  # f32, dequantized values
        twin_cfg = copy.deepcopy(raw)
        del twin_cfg["quantization_config"]
        twin_cfg["torch_dtype"] = "float32"
        write_json(os.path.join(twin, "config.json"), twin_cfg)
        write_common_files(twin)
        safetensors.torch.save_file(hub, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(d, "config.json"), raw)
        checked = check_fp8_layout(raw, hub)
        assert checked == len(kinds["fp8"]) + sum(1 for k in kinds["fp4"] if ".w2." in k) * 2, checked
        ref_dir = twin
    else:
        save_bf16(model, d)
        if spec["form"] == "hub":
            write_json(os.path.join(d, "config.json"), raw)
        ref_dir = d
    write_common_files(d)

    # The reference is the reloaded folder, run in float32.
    ref, problems = g4.load(ref_dir, "DeepseekV4ForCausalLM", torch.float32)
    assert not problems, f"{name}: loading info {problems}"
    diff = g4.state_dicts_equal(in_memory, ref.state_dict())
    assert not diff, f"{name}: {diff[:5]}"
    summary = config_summary(ref.config)
    assert summary == config_summary(model.config), f"{name}: reloaded config differs"
    run = reference_run(ref, prompt_ids)
    probe = probe_forward(ref, run["sequence"])
    assert acceptable(run, probe, spec), f"{name}: reloaded model differs from the probe"
    prefix_diff = prefix_max_abs_diff(ref, run["sequence"], len(prompt_ids), run["logits"])
    self_consistent = (
        not run["mismatch"] and run["step_max_abs_diff"] <= STEP_TOLERANCE and prefix_diff <= STEP_TOLERANCE
    )
    assert self_consistent, f"{name}: cached {run['step_max_abs_diff']} prefix {prefix_diff} mismatch {run['mismatch']}"
    if quantized:
        fp8_info = transformers_fp8_load(d, in_memory, run["sequence"], run["logits"])
    without_definition = None
    if spec.get("definition"):
        with unpatched_topk():
            seq = run["sequence"]
            with torch.no_grad():
                plain_full = ref(input_ids=seq[None], use_cache=False).logits[0].float()
            plain = reference_run(ref, prompt_ids)
            plain_prefix = prefix_max_abs_diff(ref, seq, len(prompt_ids), plain_full)
        without_definition = OrderedDict(
            full_forward_vs_definition_max_abs_diff=float(f"{float((plain_full - run['logits']).abs().max()):.3g}"),
            cached_vs_full_max_abs_diff=float(f"{plain['step_max_abs_diff']:.3g}"),
            prefix_vs_full_max_abs_diff=float(f"{plain_prefix:.3g}"),
            generated_ids=plain["generated"],
        )
        assert without_definition["cached_vs_full_max_abs_diff"] > 1e-2, without_definition

    layers, total, total_storage = describe_cache(run["cache"], ref.config)
    cache_tokens = len(run["sequence"]) - 1
    entries = compressed_entries(run["cache"], ref.config, len(run["sequence"]))
    tensors = OrderedDict(
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        generated_ids=torch.tensor(run["generated"], dtype=torch.int64),
        logits=run["logits"].contiguous(),
    )
    rot = ref.model.rotary_emb
    rope = OrderedDict(
        (t, OrderedDict(inv_freq=getattr(rot, f"{t}_inv_freq").tolist(), attention_scaling=getattr(rot, f"{t}_attention_scaling")))
        for t in rot.layer_types
    )
    idx = probe["indexer"]
    notes = [
        spec["covers"] + ".",
        f"Weights: seed {seed}; {counts['norm']} DeepseekV4RMSNorm weights = 1 + N(0, {g4.SCALE_STD}); "
        f"{counts['sink_bias']} sinks / position_bias = N(0, {SINK_STD}); {counts['tid2eid']} tid2eid tables = "
        f"{ref.config.num_experts_per_tok} distinct random experts per token id; {counts['weight']} others "
        f"(hyper-connections, router weight and e_score_correction_bias included) = N(0, {g4.WEIGHT_STD}); "
        + (
            "the quantized weights then multiplied by a random 2^{-2..1} per FP8 block / FP4 group, quantized (FP8 / "
            "FP4) and replaced by the dequantized values"
            if quantized
            else "then rounded to the file dtype"
        )
        + ".",
        f"logits: ONE forward with use_cache=False over prompt + generated ({len(run['sequence'])} positions), "
        f"float32 (upcast on load); row i predicts token i + 1"
        + (f"; from the dequantized twin {name}-dequantized" if quantized else "")
        + ".",
        f"Greedy generate(use_cache=True): max |cached step logits - full-forward logits| = "
        f"{run['step_max_abs_diff']:.3g}; max |forward over each prefix (prompt .. T-1 tokens) - full-forward rows| = "
        f"{prefix_diff:.3g}; generated ids equal the full-forward argmax: {not run['mismatch']}. "
        f"Min top-1/top-2 margin at the greedy decisions: {run['decision_margin']:.4f} (cached), "
        f"{run['full_margin']:.4f} (full forward). Min router top-k gap on routed layers: {probe['router_gap']:.4f}.",
        f"SwiGLU clamp (limit {ref.config.swiglu_limit}) in the full forward: routed experts gate > limit "
        f"{probe['routed_gate_clamped']}, |up| > limit {probe['routed_up_clamped']} of {probe['routed_values']} values "
        f"each; shared expert gate {probe['shared_gate_clamped']}, up {probe['shared_up_clamped']} of "
        f"{probe['shared_values']}.",
        f"Cache after generate holds {cache_tokens} tokens (the last generated token is not fed): {total} B "
        f"({total_storage} B of underlying storage), f32.",
    ]
    if idx["queries_with_drops"]:
        notes.append(
            f"Indexer (full forward): {idx['queries_with_drops']} (query, CSA layer) pairs have more causal compressed "
            f"entries than index_topk {ref.config.index_topk}; at the top-k boundary the smallest score gap is "
            f"{idx['min_boundary_gap']:.3g}, {idx['boundary_ties']} boundaries are exact ties "
            f"({idx['boundary_zero_ties']} of them between scores of exactly 0.0)."
        )
    doc = OrderedDict(
        generator="tests/oracle/deepseek_v4_fixtures.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        variant=name,
        **{"class": "DeepseekV4ForCausalLM"},
        config_form=spec["form"],
        reference_dtype="float32",
        experts_implementation=ref.config._experts_implementation,
        seed=seed,
        prompt_text=PROMPT_TEXT,
        prompt_ids=prompt_ids,
        generated_ids=run["generated"],
        eos_ids=g4.EOS_IDS,
        max_new_tokens=MAX_NEW_TOKENS,
        self_consistent=self_consistent,
        cached_equals_full_argmax=not run["mismatch"],
        argmax_mismatch_positions=run["mismatch"],
        cached_vs_full_max_abs_diff=float(f"{run['step_max_abs_diff']:.3g}"),
        prefix_vs_full_max_abs_diff=float(f"{prefix_diff:.3g}"),
        min_top2_margin=round(run["decision_margin"], 6),
        min_top2_margin_full_forward=round(run["full_margin"], 6),
        min_router_gap=round(probe["router_gap"], 6),
        swiglu_clamp=OrderedDict(
            limit=ref.config.swiglu_limit,
            routed_gate=probe["routed_gate_clamped"],
            routed_up=probe["routed_up_clamped"],
            routed_values=probe["routed_values"],
            shared_gate=probe["shared_gate_clamped"],
            shared_up=probe["shared_up_clamped"],
            shared_values=probe["shared_values"],
        ),
        indexer=OrderedDict(index_topk=ref.config.index_topk, **idx),
        config=summary,
        compressed_entries=OrderedDict(full_forward_tokens=len(run["sequence"]), cache_tokens=cache_tokens, layers=entries),
        rope=rope,
        cache=OrderedDict(
            tokens=cache_tokens,
            total_bytes=total,
            total_storage_bytes=total_storage,
            layers=[
                OrderedDict(
                    layer=L["decoder_layer"],
                    type=L["decoder_layer_type"],
                    cache_class=L["layer_class"],
                    bytes=L["bytes"],
                    meta=L["meta"],
                    shapes={t["name"]: t["shape"] for t in L["tensors"] if not t.get("bookkeeping") and not t.get("alias_of")},
                    aliases={t["name"]: t["alias_of"] for t in L["tensors"] if t.get("alias_of")},
                )
                for L in layers
            ],
        ),
        notes=notes,
    )
    if without_definition:
        doc["reference_selection"] = "by definition (stable top-k, ties to the lower index), see definition_topk"
        doc["reference_without_definition"] = without_definition
    if quantized:
        doc["quantization"] = OrderedDict(
            weight_block_size=[FP8_BLOCK, FP8_BLOCK],
            fp4_group=FP4_GROUP,
            fp8_tensors=len(kinds["fp8"]),
            fp4_tensors=len(kinds["fp4"]),
            distinct_fp8_scales=sorted({float(v) for k in kinds["fp8"] for v in hub[k.removesuffix(".weight") + ".scale"].float().flatten()}),
            distinct_fp4_scales=sorted({float(v) for k in kinds["fp4"] for v in hub[k.removesuffix(".weight") + ".scale"].float().flatten()}),
            unquantized_tensors=len(kinds["unquantized"]),
            quantized_modules=sorted({n.split(".", 3)[3] for n in linear_names}),
            modules_to_not_convert=skip,
            scale_name=".scale (F8_E8M0); transformers renames it to .weight_scale_inv on load",
            transformers_fp8_load=fp8_info,
            dequantized_twin=name + "-dequantized",
        )
    doc["weights"] = layout_examples(file_layout(os.path.join(d, "model.safetensors")))
    safetensors.torch.save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    compact_json.dump(doc, os.path.join(d, "reference.json"))
    if twin:
        tdoc = copy.deepcopy(doc)
        tdoc["variant"] = name + "-dequantized"
        del tdoc["quantization"]
        tdoc["dequantized_from"] = name
        tdoc["weights"] = layout_examples(file_layout(os.path.join(twin, "model.safetensors")))
        tdoc["notes"] = [
            f"The model of {name} with every quantized weight replaced by its dequantized value (F32), written by "
            f"save_pretrained; config.json is {name}'s without quantization_config. Reference outputs identical to {name}'s."
        ] + doc["notes"][1:]
        safetensors.torch.save_file(tensors, os.path.join(twin, "reference.safetensors"), metadata={"format": "pt"})
        compact_json.dump(tdoc, os.path.join(twin, "reference.json"))
    if not quiet:
        for dd in [d] + ([twin] if twin else []):
            size = sum(os.path.getsize(os.path.join(dd, f)) for f in os.listdir(dd))
            print(f"{os.path.basename(dd):<22} files={size} B")
        print(
            f"{name:<22} seed {seed} T={len(run['sequence'])} gen={run['generated']} margin={run['decision_margin']:.3f} "
            f"full margin={run['full_margin']:.3f} router gap={probe['router_gap']:.4f} step diff={run['step_max_abs_diff']:.2g} "
            f"self-consistent={self_consistent} clamp={probe['routed_gate_clamped']}/{probe['routed_up_clamped']} "
            f"indexer={dict(idx)} entries={[(e['layer'], e['full_forward'], e['cache']) for e in entries]} cache={total} B"
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
    prompt_ids = tok.encode(PROMPT_TEXT, add_special_tokens=True).ids
    assert len(prompt_ids) == 23, prompt_ids
    os.makedirs(OUT_ROOT, exist_ok=True)
    for name in args.only or list(VARIANTS):
        with definition_topk(VARIANTS[name].get("definition")):
            make_variant(name, VARIANTS[name], prompt_ids, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
