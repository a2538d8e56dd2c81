#!/usr/bin/env python3
"""Random checkpoints from safetensors headers, for benchmarks on a machine that cannot download
weights or run the oracle's transformers (a GPU machine here). Never a test fixture.

    scripts/random_checkpoint.py pack SRC... -o PAYLOAD_DIR   (here: headers, config, tokenizer)
    scripts/random_checkpoint.py make PAYLOAD_DIR/NAME DST    (there: DST gets the same tensor
                                                               names, dtypes, shapes and shards)

`pack` keeps, per source checkpoint, its config.json, generation_config.json,
tokenizer_config.json, model.safetensors.index.json (if any), tokenizer.json xz-compressed, and
`headers.json`: every shard's tensors in file order. `make` draws the values as
tests/oracle/gemma4_realsize.py does (weights N(0, 0.02), norm weights and layer scalars
1 + N(0, 0.2)), on the GPU when torch sees one, and writes each shard in one pass. Values differ from
the source checkpoint's (different generator); sizes, names and layout do not, which is what a
speed or memory figure depends on.
"""

import argparse
import json
import lzma
import os
import shutil
import struct
import sys

KEEP = ["config.json", "generation_config.json", "tokenizer_config.json",
        "model.safetensors.index.json"]


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def pack(srcs, out):
    for src in srcs:
        dst = os.path.join(out, os.path.basename(os.path.normpath(src)))
        os.makedirs(dst, exist_ok=True)
        for name in KEEP:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), dst)
        with open(os.path.join(src, "tokenizer.json"), "rb") as f, \
                lzma.open(os.path.join(dst, "tokenizer.json.xz"), "wb") as g:
            g.write(f.read())
        shards = {}
        for name in sorted(os.listdir(src)):
            if name.endswith(".safetensors"):
                h = read_header(os.path.join(src, name))
                h.pop("__metadata__", None)
                order = sorted(h, key=lambda k: h[k]["data_offsets"][0])
                shards[name] = [[k, h[k]["dtype"], h[k]["shape"]] for k in order]
        with open(os.path.join(dst, "headers.json"), "w") as f:
            json.dump(shards, f)
        print(dst, sum(len(v) for v in shards.values()), "tensors")


def make(payload, dst):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    os.makedirs(dst, exist_ok=True)
    for name in KEEP:
        if os.path.exists(os.path.join(payload, name)):
            shutil.copy(os.path.join(payload, name), dst)
    with lzma.open(os.path.join(payload, "tokenizer.json.xz"), "rb") as f, \
            open(os.path.join(dst, "tokenizer.json"), "wb") as g:
        g.write(f.read())
    with open(os.path.join(payload, "headers.json")) as f:
        shards = json.load(f)
    gen = torch.Generator(device=dev).manual_seed(7)
    for shard, tensors in shards.items():
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in tensors:
            n = dtypes[dtype].itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
            at += n
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(dst, shard), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, dtype, shape in tensors:
                scale = name.endswith("norm.weight") or name.endswith("layer_scalar")
                t = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)
                t = (1 + 0.2 * t) if scale else 0.02 * t
                f.write(t.to(dtypes[dtype]).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        print(dst, shard, at / 1e9, "GB", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("src", nargs="+")
    a.add_argument("-o", required=True)
    b = sub.add_parser("make")
    b.add_argument("payload")
    b.add_argument("dst")
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.src, args.o)
    else:
        make(args.payload, args.dst)


if __name__ == "__main__":
    sys.exit(main())
