#!/usr/bin/env python3
"""A random checkpoint of Gemma 4 E2B's real size and layout, for benchmarks (never a test).

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/gemma4_realsize.py /work/bench-e2b
    /work/oracle-env/venv/bin/python tests/oracle/gemma4_realsize.py --bench-llamacpp /work/bench-model-lc
    /work/oracle-env/venv/bin/python tests/oracle/gemma4_realsize.py --bf16-copy /work/bench-model-lc /work/bench-model-lc-bf16

Default mode writes DIR (9.26 GB; about 3.5 min on 2 busy cores, about 1 GB of memory):
  - config.json: the embedded Hub config verbatim (configs/gemma-4-E2B-it/config.json, the
    Gemma4ForConditionalGeneration wrapper with its text_config; dtype bfloat16);
  - model-0000N-of-00004.safetensors + model.safetensors.index.json: the text model's tensors, BF16,
    named as `Gemma4ForConditionalGeneration.save_pretrained` names them (`model.language_model.*`,
    the tied lm_head left out, KV-shared layers without k/v projections, `layer_scalar` buffers
    included). Names, shapes and order come from the model instantiated on the `meta` device; the
    shards are cut the way save_pretrained cuts them (huggingface_hub's rule: in state-dict order,
    a new shard when the next tensor would pass max_shard_size, a tensor larger than that alone in
    its own), with the smallest max_shard_size in whole GB that gives 4 shards; the index is
    written as save_pretrained writes it (sorted keys, indent 2, total_parameters + total_size);
  - tokenizer.json, tokenizer_config.json, generation_config.json: the bench tokenizer of
    gemma4_fixtures.py padded with `<unusedN>` specials to the real vocabulary, 262144.
The vision and audio towers (and their embed_vision / embed_audio projections, 0.48 B) are left
out unless --with-towers: llmarch reads only the text model, and llama.cpp's convert_hf_to_gguf.py
converts the text model without them (its mmproj is a separate conversion).

Values, as make_bench in gemma4_fixtures.py draws them: weights N(0, 0.02), the multiplicative
scales (every Gemma4RMSNorm weight, layer_scalar) 1 + N(0, 0.2), the audio tower's clip bounds
(--with-towers) ±(4 + |N(0, 1)|). Every tensor is drawn from its own generator seeded by --seed and
its name (crc32), in f32 chunks of 4 M values cast to bf16 and streamed to the shard file: the model
never exists in f32 (18.5 GB) nor whole in memory. Deterministic: two runs give identical files.

--bench-llamacpp DIR: the 0.2 B bench model of `gemma4_fixtures.py --bench` (same config, same draw:
seed 7, weights N(0, 0.02), scales 1 + N(0, 0.2), f32, the same padded tokenizer) with one change
llama.cpp needs: layer types S S S S S F S S S F instead of S S S S F S S S S F. llama.cpp's Gemma 4
KV sharing is hard-wired (src/llama-model.cpp: a shared sliding layer reads layer n_unshared − 2, a
shared full layer n_unshared − 1), which fits E2B (layers 13 S and 14 F) but not the bench layout
(layer 4 F, layer 5 S: llama.cpp aborts with GGML_ASSERT(map_layer_ids.find(il_reuse) != ...) in
llama-kv-cache.cpp). Here layers 6-8 read layer 4 (S) and layer 9 reads layer 5 (F), in transformers
and llama.cpp alike. Same parameter count (196,403,072) and work per token: still two full layers, one
of them shared. transformers is not timed.

--bf16-copy SRC DST: DST = SRC's safetensors weights rounded to bf16 (tensor by tensor, same names,
one file per source file), config.json with dtype bfloat16, the other files (tokenizer, generation
config) copied. For the 0.2 B bench model, so llmarch can run the checkpoint's own bf16.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time
import zlib

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemma4_fixtures import (  # noqa: E402
    BENCH_VOCAB_SIZE,
    build_tokenizer,
    cfg_bench,
    check_versions,
    multiplicative_names,
    randomize,
    write_tokenizer_files,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "gemma-4-E2B-it")
NUM_SHARDS = 4
WEIGHT_STD = 0.02
SCALE_STD = 0.2
CHUNK = 1 << 22  # values drawn per step (16 MB of f32)
TEXT_PREFIX = "model.language_model."


def meta_model(config_dir):
    cfg = transformers.AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    return cfg, model


def tensor_list(model, with_towers):
    """[(name, shape, kind)] in state-dict order, as save_pretrained would write them."""
    mult = multiplicative_names(model)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    out = []
    for name, t in model.state_dict().items():
        if name in tied:  # lm_head.weight -> model.language_model.embed_tokens.weight
            continue
        if not with_towers and not name.startswith(TEXT_PREFIX):
            continue
        if not t.is_floating_point():
            raise SystemExit(f"unexpected non-float state tensor {name} {t.dtype}")
        if name in mult:
            kind = "scale"
        elif name.endswith(("_min", "_max")) and t.dim() == 0:
            kind = "clip"
        else:
            kind = "weight"
        out.append((name, tuple(t.shape), kind))
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def split_shards(tensors, max_shard_size):
    """huggingface_hub's split_state_dict_into_shards_factory, on (name, bytes)."""
    shards, cur, cur_size = [], [], 0
    for name, shape, _ in tensors:
        size = numel(shape) * 2
        if size > max_shard_size:
            shards.append([name])
            continue
        if cur_size + size > max_shard_size:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(name)
        cur_size += size
    if cur:
        shards.append(cur)
    return shards


def pick_shards(tensors, n):
    for gb in range(1, 64):
        shards = split_shards(tensors, gb * 10**9)
        if len(shards) == n:
            return gb, shards
    raise SystemExit(f"no max_shard_size in whole GB gives {n} shards")


def draw(name, shape, kind, seed, f):
    """Stream the tensor's bf16 bytes into f, CHUNK values at a time."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    left = numel(shape)
    while left:
        n = min(left, CHUNK)
        noise = torch.randn(n, generator=g, dtype=torch.float32)
        if kind == "scale":
            val = 1.0 + SCALE_STD * noise
        elif kind == "clip":
            mag = 4.0 + noise.abs()
            val = -mag if name.endswith("_min") else mag
        else:
            val = WEIGHT_STD * noise
        f.write(val.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        left -= n


def write_shard(path, entries, seed):
    """A safetensors file written as the library writes one (header JSON padded with spaces to a
    multiple of 8, tensors in name order, contiguous), its data streamed."""
    entries = sorted(entries)
    header, off = {}, 0
    for name, shape, _ in entries:
        size = numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + size]}
        off += size
    header = {"__metadata__": {"format": "pt"}, **header}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in entries:
            draw(name, shape, kind, seed, f)
    os.replace(path + ".tmp", path)
    return off


def check_files(d, tensors):
    """Re-read every shard's header with the safetensors library: names, shapes, dtype."""
    from safetensors import safe_open

    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    want = {n: s for n, s, _ in tensors}
    assert set(wm) == set(want), "index and tensors differ"
    seen = {}
    for shard in sorted(set(wm.values())):
        with safe_open(os.path.join(d, shard), framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                assert sl.get_dtype() == "BF16", (k, sl.get_dtype())
                assert tuple(sl.get_shape()) == want[k], (k, sl.get_shape(), want[k])
                assert wm[k] == shard, (k, wm[k], shard)
                seen[k] = shard
    assert set(seen) == set(want), set(want) - set(seen)
    # A few values: the norms around 1, the weights around 0.
    name = f"{TEXT_PREFIX}layers.0.input_layernorm.weight"
    with safe_open(os.path.join(d, wm[name]), framework="pt") as sf:
        v = sf.get_tensor(name).float()
    assert abs(v.mean().item() - 1) < 0.05 and abs(v.std().item() - SCALE_STD) < 0.03, (v.mean(), v.std())
    name = f"{TEXT_PREFIX}layers.0.self_attn.q_proj.weight"
    with safe_open(os.path.join(d, wm[name]), framework="pt") as sf:
        v = sf.get_slice(name)[:64].float()
    assert abs(v.mean().item()) < 1e-3 and abs(v.std().item() - WEIGHT_STD) < 1e-3, (v.mean(), v.std())


def make_realsize(d, seed, with_towers, config_dir):
    t0 = time.time()
    cfg, model = meta_model(config_dir)
    text = cfg.get_text_config()
    tensors = tensor_list(model, with_towers)
    n_params = sum(numel(s) for n, s, _ in tensors if not n.endswith("layer_scalar"))
    total_size = sum(numel(s) * 2 for _, s, _ in tensors)
    gb, shards = pick_shards(tensors, NUM_SHARDS)
    del model

    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    shutil.copyfile(os.path.join(config_dir, "config.json"), os.path.join(d, "config.json"))
    tok = build_tokenizer(text.vocab_size)
    write_tokenizer_files(d, tok, model_max_length=text.max_position_embeddings)

    by_name = {n: (n, s, k) for n, s, k in tensors}
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        size = write_shard(os.path.join(d, fname), [by_name[n] for n in names], seed)
        for n in names:
            weight_map[n] = fname
        print(f"  {fname}: {len(names)} tensors, {size / 1e9:.2f} GB ({time.time() - t0:.0f} s)", flush=True)
    index = {"metadata": {"total_parameters": n_params, "total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    check_files(d, tensors)
    print(
        f"wrote {d}: {n_params:,} parameters + {sum(1 for n, _, _ in tensors if n.endswith('layer_scalar'))} "
        f"layer_scalar buffers, {len(tensors)} tensors, {total_size / 1e9:.2f} GB bf16 in {len(shards)} shards "
        f"(max_shard_size {gb} GB), towers {'included' if with_towers else 'left out'}, vocab {text.vocab_size}, "
        f"{time.time() - t0:.0f} s"
    )


def bf16_copy(src, dst):
    from safetensors import safe_open
    from safetensors.torch import save_file

    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    n, nbytes = 0, 0
    for f in sorted(os.listdir(src)):
        p = os.path.join(src, f)
        if f.endswith(".safetensors"):
            out = {}
            with safe_open(p, framework="pt") as sf:
                meta = sf.metadata() or {"format": "pt"}
                for k in sf.keys():
                    t = sf.get_tensor(k)
                    out[k] = t.to(torch.bfloat16) if t.is_floating_point() else t
                    n += t.numel()
                    nbytes += out[k].numel() * out[k].element_size()
            save_file(out, os.path.join(dst, f), metadata=meta)
            del out
        elif f == "config.json":
            with open(p) as fh:
                cfg = json.load(fh)
            for c in [cfg] + [v for v in cfg.values() if isinstance(v, dict) and "model_type" in v]:
                if "dtype" in c or c is cfg:
                    c["dtype"] = "bfloat16"
                if "torch_dtype" in c:
                    c["torch_dtype"] = "bfloat16"
            with open(os.path.join(dst, f), "w", encoding="utf-8") as fh:
                json.dump(cfg, fh, indent=2, sort_keys=True)
                fh.write("\n")
        elif os.path.isfile(p) and not f.startswith("bench_"):
            shutil.copyfile(p, os.path.join(dst, f))
    idx = os.path.join(dst, "model.safetensors.index.json")
    if os.path.exists(idx):  # a sharded source: the same shards, the bf16 total size
        with open(idx) as fh:
            index = json.load(fh)
        index.setdefault("metadata", {})["total_size"] = nbytes
        with open(idx, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print(f"wrote {dst}: {n:,} values in bf16 ({nbytes / 1e6:.0f} MB) from {src}")


def make_bench_llamacpp(d):
    from gemma4_fixtures import text_config

    # cfg_bench()'s arguments (gemma4_fixtures.py), the layer types changed; the parameter count
    # is checked against cfg_bench's own model below.
    layer_types = ["full_attention" if i in (5, 9) else "sliding_attention" for i in range(10)]
    cfg = text_config(
        vocab_size=BENCH_VOCAB_SIZE,
        vocab_size_per_layer_input=BENCH_VOCAB_SIZE,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        layer_types=layer_types,
        sliding_window=512,
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=128,
        use_double_wide_mlp=True,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        want = sum(p.numel() for p in transformers.Gemma4ForCausalLM(cfg_bench()).parameters())
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    torch.manual_seed(7)
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    kinds = randomize(model, 7, weight_std=0.02, scale_std=0.2)
    n = sum(p.numel() for p in model.parameters())
    assert n == want, (n, want)
    model.save_pretrained(d)
    write_tokenizer_files(d, build_tokenizer(BENCH_VOCAB_SIZE), model_max_length=cfg.max_position_embeddings)
    print(f"wrote {d}: {n} parameters ({n * 4 / 1e9:.3f} GB f32), {len(kinds['weight'])} tensors, "
          f"layer types {''.join('F' if t == 'full_attention' else 'S' for t in cfg.layer_types)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output folder (default /work/bench-e2b)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--with-towers", action="store_true", help="also write the vision and audio towers (+0.48 B)")
    ap.add_argument("--configs", default=CONFIG_DIR, help="folder holding the E2B config.json")
    ap.add_argument("--bench-llamacpp", metavar="DIR", help="write the llama.cpp-compatible 0.2 B bench model to DIR")
    ap.add_argument("--bf16-copy", nargs=2, metavar=("SRC", "DST"), help="write a bf16 copy of checkpoint SRC to DST")
    args = ap.parse_args()
    check_versions()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.bf16_copy:
        bf16_copy(*args.bf16_copy)
        return 0
    if args.bench_llamacpp:
        make_bench_llamacpp(args.bench_llamacpp)
        return 0
    make_realsize(args.out or "/work/bench-e2b", args.seed, args.with_towers, args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
