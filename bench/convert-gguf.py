#!/usr/bin/env python3
"""llama.cpp's convert_hf_to_gguf.py, with Gemma 4's per-layer-embedding table written in row chunks.

    PYTHON bench/convert-gguf.py LLAMA_SRC CHECKPOINT --outtype bf16 --outfile X.gguf [other converter flags]

LLAMA_SRC is llama.cpp's source folder (`DIR/src` after ../shared/bench/build-llamacpp.sh DIR); PYTHON
needs torch, numpy, sentencepiece and transformers (the tests/oracle venv). Every argument after
LLAMA_SRC goes to convert_hf_to_gguf.py unchanged, and the file it writes is the one the plain converter
writes (byte for byte: checked on the 0.2 B bench model, f32 and bf16).

Why: the converter widens each tensor to f32 whole and keeps its converted copy in memory before
writing it. Gemma 4 E2B's `embed_tokens_per_layer` is 262144 × 8960 (2.35 B values): in bf16 that
is ~19 GB of memory for one tensor. Here that one tensor goes through gguf-py's LazyChunkedTensor
(what llama.cpp's own Qwen4Exp conversion uses for its large PLE table): 16 M values at a time are
read from the mapped safetensors, widened to f32, converted to the output type and written. Nothing
else changes; the table needs no other transformation in the Gemma 4 converter (only its name is
mapped), which this script asserts.
"""

import os
import runpy
import sys

if len(sys.argv) < 3:
    sys.exit(__doc__)
SRC = os.path.abspath(sys.argv.pop(1))
CONVERT = os.path.join(SRC, "convert_hf_to_gguf.py")
if not os.path.isfile(CONVERT):
    sys.exit(f"no {CONVERT}")
sys.path[:0] = [SRC, os.path.join(SRC, "gguf-py")]

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conversion import base, gemma  # noqa: E402

CHUNK_VALUES = 1 << 24
TABLE = "embed_tokens_per_layer.weight"

_modify_tensors = gemma.Gemma4Model.modify_tensors
assert gemma.Gemma4Model.norm_shift(None, TABLE) == 0.0  # the table is not shifted like a norm


def modify_tensors(self, data_torch, name, bid):
    if not name.endswith(TABLE) or data_torch.dim() != 2:
        return _modify_tensors(self, data_torch, name, bid)
    rows, cols = (int(d) for d in data_torch.shape)
    step = max(1, CHUNK_VALUES // cols)

    def loader(r0, r1):
        def load():
            # a fresh lazy tensor every call (to_eager memoizes); the rows are views of the mapping
            eager = base.LazyTorchTensor.to_eager(self.model_tensors[name]())
            return eager[r0:r1].to(torch.float32).contiguous().numpy()

        return load

    table = gguf.LazyChunkedTensor(
        [loader(r, min(r + step, rows)) for r in range(0, rows, step)], shape=(rows, cols), dtype=np.float32
    )
    return [(self.map_tensor_name(name), table)]


gemma.Gemma4Model.modify_tensors = modify_tensors
sys.argv[0] = CONVERT
runpy.run_path(CONVERT, run_name="__main__")
