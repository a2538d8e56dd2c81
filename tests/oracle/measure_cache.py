#!/usr/bin/env python3
"""Reference KV-cache contents for tiny configs of every supported family.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/measure_cache.py

For every variant below this script
  1. builds a tiny config with the reference config class and writes it with
     `config.save_pretrained(tests/fixtures/tiny/<name>/)` (so the JSON is exactly what
     transformers writes, e.g. Gemma's `per_layer_config` form),
  2. reloads it with `AutoConfig.from_pretrained`, builds the text causal-LM class
     (`cfg.get_text_config()` for the multimodal wrappers) in float32 with a fixed seed,
  3. runs ONE forward pass over N random token ids (batch 1) with `use_cache=True`,
     letting the model create its default cache (`DynamicCache(config=...)`),
  4. walks `past_key_values.layers` and records every torch.Tensor held by every cache
     layer object (plain attributes and the values of dict / list attributes),
  5. repeats 3-4 after `model.to(torch.bfloat16)`.

Everything is written to tests/fixtures/reference_cache.json (see tests/oracle/README.md for
the format). Deterministic: fixed seeds, single thread, CPU only.
"""

import argparse
import json
import os
import shutil
import sys
from collections import OrderedDict

import torch
import transformers
from transformers import AutoConfig
from transformers.cache_utils import DummyLayer, LinearAttentionCacheLayerMixin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
TINY_DIR = os.path.join(FIXTURES, "tiny")
OUT_PATH = os.path.join(FIXTURES, "reference_cache.json")

# Token counts of the forward passes, per dtype. 43 is larger than every window (8, 16) and
# every compression rate (4, 8), and is not a multiple of either rate, so the DeepSeek
# compressor buffers keep a remainder. 5 is shorter than every window minus one (the
# min(N, window - 1) branch) and shorter than the HCA rate (no compressed entry yet).
RUNS = (("float32", 43), ("float32", 5), ("bfloat16", 43))
DTYPES = ("float32", "bfloat16")
VOCAB = 256

CAUSAL_LM = {
    "gemma4_text": "Gemma4ForCausalLM",
    "laguna": "LagunaForCausalLM",
    "zaya": "ZayaForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}

S, F = "sliding_attention", "full_attention"


# --------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------


def gemma_rope():
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


def cfg_gemma4_e2b_like():
    # E2B shape in miniature: 1 KV head everywhere, full layers with a wider head (global_head_dim),
    # the last `num_kv_shared_layers` layers reuse the KV of the last producer of their type
    # (layer 1 for sliding, layer 2 for full), PLE, double-wide MLP on the shared layers.
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        layer_types=[S, S, F, S, S, F],
        sliding_window=8,
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        use_double_wide_mlp=True,
        max_position_embeddings=512,
        rope_parameters=gemma_rope(),
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    )


def cfg_gemma4_moe_keqv():
    # 26B-A4B shape in miniature: K=V on full layers (no v_proj), fewer global KV heads,
    # dense MLP + MoE block on every layer, no PLE, no KV sharing.
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        layer_types=[S, S, F, S, S, F],
        sliding_window=16,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        max_position_embeddings=512,
        rope_parameters=gemma_rope(),
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    )


def cfg_gemma4_wrapper():
    # Multimodal wrapper around a small KV-sharing text config (E4B-like: 2 KV heads, 7 layers,
    # 2 shared layers). vision_config / audio_config are None.
    from transformers import Gemma4Config, Gemma4TextConfig

    text = Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        layer_types=[S, S, S, F, S, S, F],
        sliding_window=8,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        use_double_wide_mlp=False,
        max_position_embeddings=512,
        rope_parameters=gemma_rope(),
        tie_word_embeddings=True,
    )
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None)


def cfg_laguna():
    from transformers import LagunaConfig

    return LagunaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_attention_heads_per_layer=[4, 8, 8, 4],
        num_key_value_heads=2,
        head_dim=16,
        layer_types=[F, S, S, F],
        sliding_window=8,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        moe_routed_scaling_factor=2.5,
        gating="per-head",
        max_position_embeddings=512,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        },
        tie_word_embeddings=False,
    )


def _zaya(layer_types, sliding_window):
    from transformers import ZayaConfig

    return ZayaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=1,
        router_hidden_size=16,
        layer_types=layer_types,
        sliding_window=sliding_window,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


def cfg_zaya():
    return _zaya(["hybrid"] * 3, None)


def cfg_zaya_sliding():
    return _zaya(["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"], 8)


def cfg_deepseek_v4():
    from transformers import DeepseekV4Config

    return DeepseekV4Config(
        vocab_size=VOCAB,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        q_lora_rank=32,
        partial_rotary_factor=0.25,  # qk_rope_head_dim 8
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        layer_types=[
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        hc_mult=2,
        hc_sinkhorn_iters=3,
        sliding_window=8,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=3,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        tie_word_embeddings=False,
    )


QWEN_ROPE = {
    "rope_type": "default",
    "rope_theta": 10_000_000.0,
    "partial_rotary_factor": 0.25,
    "mrope_interleaved": True,
    "mrope_section": [2, 1, 1],  # sums to head_dim * partial_rotary_factor / 2 = 4
}

QWEN_LAYERS = ["linear_attention"] * 3 + [F] + ["linear_attention"] * 3 + [F]


def _qwen_text_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=len(QWEN_LAYERS),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=list(QWEN_LAYERS),
        max_position_embeddings=512,
        rope_parameters=dict(QWEN_ROPE),
        tie_word_embeddings=False,
    )


def cfg_qwen3_5():
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(intermediate_size=128, **_qwen_text_kwargs())


def cfg_qwen3_5_moe():
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        **_qwen_text_kwargs(),
    )


def cfg_qwen3_5_wrapper():
    from transformers import Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig

    text = Qwen3_5TextConfig(intermediate_size=128, **_qwen_text_kwargs())
    vision = Qwen3_5VisionConfig(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        num_position_embeddings=64,
    )
    return Qwen3_5Config(text_config=text, vision_config=vision)


VARIANTS = OrderedDict(
    [
        ("gemma4-e2b-like", cfg_gemma4_e2b_like),
        ("gemma4-moe-keqv", cfg_gemma4_moe_keqv),
        ("gemma4-wrapper", cfg_gemma4_wrapper),
        ("laguna", cfg_laguna),
        ("zaya", cfg_zaya),
        ("zaya-sliding", cfg_zaya_sliding),
        ("deepseek-v4", cfg_deepseek_v4),
        ("qwen3_5", cfg_qwen3_5),
        ("qwen3_5-moe", cfg_qwen3_5_moe),
        ("qwen3_5-wrapper", cfg_qwen3_5_wrapper),
    ]
)


# --------------------------------------------------------------------------------------
# Cache walking
# --------------------------------------------------------------------------------------

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}


def dtype_name(dt):
    return DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


def iter_tensors(layer):
    """Yield (name, tensor) for every tensor reachable from the layer's attributes
    (directly, or as a value of a dict / element of a list or tuple)."""
    for attr, val in sorted(vars(layer).items()):
        if isinstance(val, torch.Tensor):
            yield attr, val
        elif isinstance(val, dict):
            for k, v in val.items():
                if isinstance(v, torch.Tensor):
                    yield f"{attr}[{k!r}]" if isinstance(k, str) else f"{attr}[{k}]", v
        elif isinstance(val, (list, tuple)):
            for i, v in enumerate(val):
                if isinstance(v, torch.Tensor):
                    yield f"{attr}[{i}]", v


META_KEYS = ("cumulative_length", "sliding_window", "compress_rate", "entry_count", "conv_kernel_size")


def scalar_meta(layer):
    """Non-tensor bookkeeping that explains the shapes (token counters, windows, rates)."""
    meta = {}
    for attr in META_KEYS:
        val = getattr(layer, attr, None)
        if isinstance(val, dict):
            meta[attr] = {str(k): v for k, v in val.items()}
        elif isinstance(val, int):
            meta[attr] = val
    return meta


def describe_cache(cache, text_cfg):
    layer_types = list(getattr(text_cfg, "layer_types", None) or [])
    sharing = getattr(text_cfg, "kv_sharing_modes", None)
    layers = []
    total = 0
    total_storage = 0
    seen_storage = {}  # storage ptr -> bytes, across the whole cache
    for i, layer in enumerate(cache.layers):
        tensors = []
        layer_bytes = 0
        bookkeeping = 0
        first_by_view = {}
        for name, t in iter_tensors(layer):
            nbytes = t.numel() * t.element_size()
            entry = OrderedDict(
                name=name, shape=list(t.shape), dtype=dtype_name(t.dtype), bytes=nbytes
            )
            # Same storage, same offset, same shape/strides -> the very same data (e.g. DeepSeek keys/values).
            view_key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            st = t.untyped_storage()
            storage_bytes = st.nbytes()
            if storage_bytes != nbytes:
                # A view (slice) that keeps a larger tensor alive, e.g. the sliding-window slice of the
                # N-token prefill tensor, or a DeepSeek compressor buffer sliced from the projection.
                entry["storage_bytes"] = storage_bytes
            if name.startswith("_") and t.dim() == 0:
                # `_sliding_window_tensor`: a 0-d int64 copy of the window size, not state.
                entry["bookkeeping"] = True
                bookkeeping += nbytes
            elif view_key in first_by_view:
                entry["alias_of"] = first_by_view[view_key]
            else:
                first_by_view[view_key] = name
                layer_bytes += nbytes
            if not entry.get("bookkeeping") and st.data_ptr() not in seen_storage and storage_bytes:
                seen_storage[st.data_ptr()] = storage_bytes
                total_storage += storage_bytes
            tensors.append(entry)
        total += layer_bytes
        rec = OrderedDict(
            cache_index=i,
            decoder_layer=i,
            decoder_layer_type=layer_types[i] if i < len(layer_types) else None,
        )
        if sharing is not None:
            rec["kv_sharing_mode"] = sharing[i]
        rec["layer_class"] = type(layer).__name__
        rec["is_dummy"] = isinstance(layer, DummyLayer)
        rec["is_linear"] = isinstance(layer, LinearAttentionCacheLayerMixin)
        rec["tensors"] = tensors
        rec["bytes"] = layer_bytes
        if bookkeeping:
            rec["bookkeeping_bytes"] = bookkeeping
        rec["meta"] = scalar_meta(layer)
        layers.append(rec)
    return layers, total, total_storage


# --------------------------------------------------------------------------------------
# Notes (cache index -> decoder layer mapping and deviations from plain K/V)
# --------------------------------------------------------------------------------------

NOTES = {
    "gemma4": (
        "DynamicCache(config) builds exactly one cache layer per decoder layer (cache_index == decoder layer index). "
        "Sliding layers -> DynamicSlidingWindowLayer holding K and V for the last min(N, sliding_window - 1) tokens "
        "(window - 1, not window). Full layers -> DynamicLayer with all N tokens; full layers use the per_layer_config "
        "head_dim (global_head_dim) and, only when attention_k_eq_v, num_key_value_heads (num_global_key_value_heads). "
        "KV-shared layers (kv_sharing_mode 'reuse', the last num_kv_shared_layers) get a DummyLayer with keys = values = "
        "None: no tensors, 0 bytes; they read the K/V of the last non-shared layer of the same layer type (mode 'store') "
        "from a side dict during the forward. With attention_k_eq_v the full layers have no v_proj, but the cache still "
        "stores two distinct tensors: keys (k_norm + RoPE) and values (v_norm of the same projection, no RoPE), so the "
        "bytes are 2x, not 1x."
    ),
    "laguna": (
        "One cache layer per decoder layer. full_attention -> DynamicLayer (N tokens), sliding_attention -> "
        "DynamicSlidingWindowLayer (min(N, sliding_window - 1) tokens). KV heads = num_key_value_heads on every layer; "
        "num_attention_heads_per_layer only changes the query heads and does not affect the cache. K and V are stored "
        "as separate tensors of identical shape."
    ),
    "zaya": (
        "One cache layer per decoder layer. 'hybrid' -> LinearAttentionAndFullAttentionLayer, 'hybrid_sliding' -> "
        "LinearAttentionAndSlidingWindowAttentionLayer. Besides keys/values ([1, num_key_value_heads, T, head_dim], "
        "T = N for hybrid, min(N, sliding_window - 1) for hybrid_sliding) each layer holds conv_states[0] = the CCA "
        "q/k conv tail [1, (num_attention_heads + num_key_value_heads) * head_dim, (cca_time0 - 1) + (cca_time1 - 1)] "
        "and recurrent_states[0] = the previous token's delayed value projection [1, num_key_value_heads * head_dim / 2]. "
        "Both follow the model dtype."
    ),
    "deepseek_v4": (
        "One cache layer per decoder layer. sliding_attention -> plain DynamicSlidingWindowLayer: K and V are the same "
        "projection (shared-KV MQA, 1 head) but this generic layer stores two separate copies (keys and values, each "
        "[1, 1, min(N, sliding_window - 1), head_dim]). compressed_sparse_attention -> DeepseekV4CSACache and "
        "heavily_compressed_attention -> DeepseekV4HCACache: the sliding part stores keys once and values is the same "
        "tensor object (alias_of keys, counted once), plus compressor state: compressed_kv['compressor'] "
        "[1, floor(N / rate), head_dim], buffer_kv/buffer_gate['compressor'] holding the N mod rate not-yet-compressed "
        "projected tokens ([1, N mod rate, head_dim] for HCA, [1, N mod rate, 2 * head_dim] for CSA), and for CSA "
        "additionally overlap_kv/overlap_gate['compressor'] [1, rate, head_dim] (last window's Ca half) and the same "
        "set under the 'indexer' key at index_head_dim: compressed_kv['indexer'] [1, floor(N / rate), index_head_dim], "
        "buffer_kv/buffer_gate['indexer'] [1, N mod rate, 2 * index_head_dim], overlap_kv/overlap_gate['indexer'] "
        "[1, rate, index_head_dim]. The overlap tensors only appear once at least one window closed (N >= rate)."
    ),
    "qwen3_5": (
        "One cache layer per decoder layer. linear_attention -> LinearAttentionLayer with conv_states[0] "
        "[1, 2 * linear_num_key_heads * linear_key_head_dim + linear_num_value_heads * linear_value_head_dim, "
        "linear_conv_kernel_dim] (model dtype; the full kernel width, not kernel - 1) and recurrent_states[0] [1, linear_num_value_heads, linear_key_head_dim, "
        "linear_value_head_dim] (always float32 on the torch path, also under bfloat16). full_attention -> DynamicLayer "
        "with keys/values [1, num_key_value_heads, N, head_dim]. No MTP layer and no cache layer for it."
    ),
}


def variant_note(text_cfg, layers, n_tokens, dtype):
    """Data-driven summary of this entry: index mapping and every deviation from
    'K and V for min(N, window) tokens in the model dtype'."""
    parts = [
        f"{len(layers)} cache layers for {text_cfg.num_hidden_layers} decoder layers; "
        "cache_index == decoder layer index."
    ]
    dummies = [L["cache_index"] for L in layers if L["is_dummy"]]
    sharing = getattr(text_cfg, "kv_sharing_modes", None)
    if sharing is not None and any(m is not None for m in sharing):
        producers = {text_cfg.layer_types[i]: i for i, m in enumerate(sharing) if m == "store"}
        prod = ", ".join(f"{t} from layer {i}" for t, i in sorted(producers.items()))
        parts.append(f"Layers {dummies} are KV-shared DummyLayer (no tensors, 0 bytes); they reuse {prod}.")
    elif dummies:
        parts.append(f"Layers {dummies} are DummyLayer (no tensors).")
    # sliding layers: tokens kept
    sliding = {}
    for L in layers:
        w = L["meta"].get("sliding_window")
        keys = next((t for t in L["tensors"] if t["name"] == "keys"), None)
        if w is not None and keys is not None:
            sliding.setdefault((w, keys["shape"][2]), []).append(L["cache_index"])
    for (w, kept), idx in sorted(sliding.items()):
        parts.append(
            f"Sliding layers {idx} (window {w}) keep {kept} tokens = min(N={n_tokens}, window - 1 = {w - 1})."
        )
    aliased = [L["cache_index"] for L in layers if any("alias_of" in t for t in L["tensors"])]
    if aliased:
        parts.append(f"Layers {aliased}: values is the same tensor as keys (counted once).")
    views = sorted({L["cache_index"] for L in layers for t in L["tensors"] if "storage_bytes" in t})
    if views:
        parts.append(
            f"Layers {views} hold views whose storage_bytes exceed bytes (slices of larger prefill tensors)."
        )
    odd = sorted(
        {
            (t["name"], t["dtype"])
            for L in layers
            for t in L["tensors"]
            if not t.get("bookkeeping") and t["dtype"] != dtype
        }
    )
    if odd:
        parts.append(
            "Not in the model dtype: " + ", ".join(f"{n} is {d}" for n, d in odd) + f" (model dtype {dtype})."
        )
    extra = sorted(
        {
            t["name"]
            for L in layers
            for t in L["tensors"]
            if not t.get("bookkeeping") and t["name"] not in ("keys", "values")
        }
    )
    if extra:
        parts.append("State besides keys/values: " + ", ".join(extra) + ".")
    return " ".join(parts)


def family_of(model_type):
    if model_type.startswith("gemma4"):
        return "gemma4"
    if model_type.startswith("qwen3_5"):
        return "qwen3_5"
    return model_type


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def write_config(name, cfg):
    d = os.path.join(TINY_DIR, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg.save_pretrained(d)
    return d


def run_variant(name, cfg_dir, runs):
    cfg = AutoConfig.from_pretrained(cfg_dir)
    text_cfg = cfg.get_text_config()
    cls_name = CAUSAL_LM[text_cfg.model_type]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = cls(text_cfg).eval()
    results = []
    for dtype in DTYPES:
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        for n in [n for d, n in runs if d == dtype]:
            g = torch.Generator().manual_seed(1234 + n)
            ids = torch.randint(3, VOCAB, (1, n), generator=g)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
            cache = out.past_key_values
            layers, total, total_storage = describe_cache(cache, text_cfg)
            results.append(
                OrderedDict(
                    name=name,
                    config_dir=f"tests/fixtures/tiny/{name}",
                    config_class=type(cfg).__name__,
                    text_config_class=type(text_cfg).__name__,
                    **{"class": cls_name},
                    tokens=n,
                    batch=1,
                    dtype=dtype,
                    cache_class=type(cache).__name__,
                    num_cache_layers=len(cache.layers),
                    num_hidden_layers=text_cfg.num_hidden_layers,
                    layers=layers,
                    total_bytes=total,
                    total_storage_bytes=total_storage,
                    family=family_of(text_cfg.model_type),
                    notes=variant_note(text_cfg, layers, n, dtype),
                )
            )
    return results


def summarize(entry):
    lines = [f"{entry['name']:<16} {entry['dtype']:<8} N={entry['tokens']:<3} total={entry['total_bytes']:>7} B"]
    for L in entry["layers"]:
        ts = ", ".join(
            f"{t['name']}{tuple(t['shape'])}:{t['dtype'][:4]}"
            + (" =alias" if "alias_of" in t else "")
            for t in L["tensors"]
            if not t.get("bookkeeping")
        )
        lines.append(f"    [{L['cache_index']}] {L['decoder_layer_type']:<30} {L['layer_class']:<46} {L['bytes']:>6}  {ts}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="subset of variant names")
    ap.add_argument("--out", default=OUT_PATH)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    names = args.only or list(VARIANTS)
    all_entries = []
    for name in names:
        cfg = VARIANTS[name]()
        d = write_config(name, cfg)
        entries = run_variant(name, d, RUNS)
        all_entries.extend(entries)
        if not args.quiet:
            for e in entries:
                print(summarize(e))

    if args.only and os.path.exists(args.out):
        # Merge into the existing fixture, replacing the re-run variants.
        with open(args.out) as f:
            old = json.load(f)
        keep = [e for e in old["entries"] if e["name"] not in names]
        all_entries = keep + all_entries
        order = list(VARIANTS)
        all_entries.sort(key=lambda e: (order.index(e["name"]), DTYPES.index(e["dtype"]), -e["tokens"]))

    doc = OrderedDict(
        generator="tests/oracle/measure_cache.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        device="cpu",
        family_notes=NOTES,
        entries=all_entries,
    )
    compact_json.dump(doc, args.out)
    print(f"wrote {len(all_entries)} entries -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
