#!/usr/bin/env python3
"""The reference's outputs with GGML q8_0 (or q4_0) weights, for `llmarch run --dtype q8_0|q4_0`.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/q8_0_fixtures.py                  # -> tests/fixtures/q8_0/
    /work/oracle-env/venv/bin/python tests/oracle/q8_0_fixtures.py --format q4_0    # -> tests/fixtures/q4_0/

`--format q4_0` does the same with GGML's `quantize_row_q4_0_ref` (blocks of 32, `d = m / -8` where
`m` is the block's value of largest magnitude with its sign, `q = min(15, trunc(w / d + 8.5))`, `d`
stored as f16, so each weight becomes `f16(d) * (q - 8)`); everything else below holds for it too.

`--dtype q8_0` quantizes the weight matrices at load (GGML's `quantize_row_q8_0_ref`: blocks of
32 weights along each row, `d = max|w| / 127` in f32, `q = roundf(w / d)` half away from zero,
`d` stored as f16, so each weight becomes `f16(d) * q`) and keeps everything else f32. For each
fixture in FIXTURES this script loads the fixture's checkpoint in float32 with transformers 5.23.0,
replaces exactly the weights llmarch quantizes by their q8_0 values, and records what the
reference then computes:

- quantized: every `nn.Linear` weight whose input width is a multiple of 32, except the
  routers' and gates' (any module under a `router`, `gate`, `shared_expert_gate` or `weights_proj`
  component: Gemma 4's `router.proj`, Laguna's
  `mlp.gate`, ZAYA's `mlp.gate.*`), which llmarch keeps f32 because they pick experts; packed
  expert tensors (`experts.gate_up_proj` `[E, out, in]`, `experts.down_proj`) per expert and row;
  and the output head, also when tied (the head gets a q8_0 copy; the token embedding it shares
  stays f32, so the tie is cut here first);
- left f32: embeddings (and Gemma's per-layer embedding table), norms, convolutions, biases, every
  other tensor, and matrices whose input width is not a multiple of 32.

Per fixture it runs greedy `generate(use_cache=True)` from the fixture's prompt, then ONE full
forward without a cache over prompt + continuation, and writes `tests/fixtures/q8_0/<name>/`:
`reference.safetensors` (`logits` [positions, vocab] f32; row i predicts token i + 1) and
`reference.json` (prompt and generated ids, the top-1/top-2 margin at each greedy decision, the
quantized tensor names, and how far these logits are from the fixture's f32 ones).

`--bench MODEL_DIR --prompt-ids 2,17,... --logits FILE`: no files written; compares llmarch's
`--logits-out` of a q8_0 run over those prompt ids with the reference given the same q8_0
weights, and prints both of their distances from the reference in f32 (see bench/README.md).

Deterministic: CPU, torch.set_num_threads(1); two runs give identical files.
"""

import argparse
import json
import os
import sys
from collections import OrderedDict

import safetensors.torch
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures")
BLOCK = 32

# (output folder, fixture folder under tests/fixtures)
FIXTURES = [
    ("gemma4-e2b-like", "gemma4/e2b-like"),  # PLE, KV sharing, tied head
    ("gemma4-moe-keqv", "gemma4/moe-keqv"),  # packed experts beside the MLP, softmax router, K=V
    ("laguna-xs2-like", "laguna/xs2-like"),  # per-expert Hub layout, sigmoid router, output gate, untied head
    ("zaya-hybrid", "zaya/hybrid"),  # CCA, MLP router with a carried state, tied head
    ("deepseek_v4-flash-like", "deepseek_v4/flash-like"),  # CSA/HCA compressors, indexer, hash routing, mHC
    ("qwen3_5-dense", "qwen3_5/dense"),  # Gated DeltaNet, gated full attention, untied head
]


def q8_0(w):
    """GGML q8_0 round trip of `w` [..., in] (in a multiple of 32), in float32."""
    shape = w.shape
    b = w.detach().float().reshape(-1, shape[-1] // BLOCK, BLOCK)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    x = b * inv
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # roundf: half away from zero
    return (q * d.half().float()).reshape(shape)


def q4_0(w):
    """GGML q4_0 round trip of `w` [..., in] (in a multiple of 32), in float32."""
    shape = w.shape
    b = w.detach().float().reshape(-1, shape[-1] // BLOCK, BLOCK)
    # The first value of largest magnitude, sign kept (GGML's strict `amax < |v|` scan).
    idx = b.abs().argmax(-1, keepdim=True)
    m = torch.gather(b, -1, idx)
    d = m / -8.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.clamp(torch.trunc(b * inv + 8.5), max=15.0)
    return ((q - 8.0) * d.half().float()).reshape(shape)


ROUND = {"q8_0": q8_0, "q4_0": q4_0}
FORMAT = "q8_0"  # set by --format


def is_router(module_name):
    # Qwen3.5's `shared_expert_gate` (a sigmoid gate on the shared expert) stays f32 in llmarch
    # too, like DeepSeek V4's indexer `weights_proj`.
    return any(part in ("router", "gate", "shared_expert_gate", "weights_proj") for part in module_name.split("."))


# Linear modules of the reference that llmarch does not hold as a projection, so never quantizes:
# DeepSeek V4's grouped `o_a_proj` [groups * o_lora_rank, heads * head_dim / groups] is applied
# per group as a batched product of the plain tensor (src/arch/deepseek_v4/model.rs), in f32.
NOT_A_PROJECTION_IN_LLMARCH = ("o_a_proj",)


def kept_f32(module_name):
    return is_router(module_name) or module_name.split(".")[-1] in NOT_A_PROJECTION_IN_LLMARCH


@torch.no_grad()
def quantize_like_llmarch(model):
    """Replaces, in place, the weights llmarch quantizes by their FORMAT values; returns their names."""
    rnd = ROUND[FORMAT]
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())  # untie: the lookup stays f32
    done = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features % BLOCK == 0 and not kept_f32(name):
            mod.weight.copy_(rnd(mod.weight))
            done.append(f"{name}.weight")
    for name, p in model.named_parameters():
        packed = name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")
        if packed and p.dim() == 3 and p.shape[-1] % BLOCK == 0:
            p.copy_(rnd(p))
            done.append(name)
    return done


def rel_rms(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def greedy_then_full(model, prompt_ids, max_new_tokens, eos_ids):
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        eos_token_id=eos_ids,
        return_dict_in_generate=True,
    )
    seq = out.sequences[0]
    generated = seq[len(prompt_ids) :].tolist()
    full = model(input_ids=seq[None], use_cache=False).logits[0].float()
    p = len(prompt_ids)
    top = torch.topk(full[p - 1 : p - 1 + len(generated)], 2, dim=-1).values
    margins = (top[:, 0] - top[:, 1]).tolist()
    return seq.tolist(), generated, full, margins


def load(d):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{d}: {problems}"
    return model.eval()


def make(name, fixture):
    src = os.path.join(FIXTURES_ROOT, fixture)
    ref = json.load(open(os.path.join(src, "reference.json")))
    f32_logits = safetensors.torch.load_file(os.path.join(src, "reference.safetensors"))["logits"]
    prompt = ref["prompt_ids"]
    f32_seq = prompt + ref["generated_ids"]

    model = load(src)
    quantized = quantize_like_llmarch(model)
    seq, generated, logits, margins = greedy_then_full(model, prompt, len(ref["generated_ids"]), ref["eos_ids"])
    with torch.no_grad():
        # The f32 reference's own sequence through the q8_0 model: same inputs, so the distance is
        # what q8_0 does to the logits.
        on_f32_seq = model(input_ids=torch.tensor([f32_seq]), use_cache=False).logits[0].float()
    n = len(f32_seq)
    dist = rel_rms(on_f32_seq, f32_logits[:n])
    agree = float((on_f32_seq.argmax(-1) == f32_logits[:n].argmax(-1)).float().mean())

    out = os.path.join(FIXTURES_ROOT, FORMAT, name)
    os.makedirs(out, exist_ok=True)
    safetensors.torch.save_file(
        {"logits": logits.contiguous(), "logits_on_f32_sequence": on_f32_seq.contiguous()},
        os.path.join(out, "reference.safetensors"),
        metadata={"format": "pt"},
    )
    os.chmod(os.path.join(out, "reference.safetensors"), 0o644)
    doc = OrderedDict(
        generator="tests/oracle/q8_0_fixtures.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        fixture=f"tests/fixtures/{fixture}",
        prompt_ids=prompt,
        generated_ids=generated,
        eos_ids=ref["eos_ids"],
        top2_margins=[round(m, 6) for m in margins],
        f32_sequence=f32_seq,
        format=FORMAT,
        quantized_vs_f32_rel_rms=round(dist, 6),
        quantized_vs_f32_argmax_agreement=round(agree, 4),
        quantized=quantized,
        notes=[
            f"Weights: the fixture's, with the tensors in `quantized` replaced by their GGML {FORMAT} values "
            + ("(blocks of 32 along each row, d = max|w|/127, q = roundf(w/d), f16 d); the rest f32."
               if FORMAT == "q8_0" else
               "(blocks of 32 along each row, d = m/-8 for the largest-magnitude m, q = min(15, trunc(w/d + 8.5)), "
               "w = f16 d * (q - 8)); the rest f32."),
            f"logits: ONE forward with use_cache=False over prompt + generated ({len(seq)} positions); "
            "logits_on_f32_sequence: the same model over the f32 fixture's prompt + generated.",
            f"quantized_vs_f32_rel_rms: ||logits_on_f32_sequence - f32 logits|| / ||f32 logits|| = {dist:.4f} "
            f"(argmax agrees at {agree:.0%} of positions): the fixture's random weights amplify any small "
            f"weight change layer after layer, so this is what {FORMAT} itself costs here, not an error of llmarch.",
        ],
    )
    compact_json.dump(doc, os.path.join(out, "reference.json"))
    print(f"{name}: {len(quantized)} tensors quantized to {FORMAT}, {len(generated)} generated, min margin "
          f"{min(margins):.4f}, {FORMAT} vs f32 rel RMS {dist:.4f}, argmax agreement {agree:.0%}")


def bench(model_dir, prompt_ids, logits_path):
    ids = torch.tensor([prompt_ids])
    ours = safetensors.torch.load_file(logits_path)["logits"][: len(prompt_ids)]
    model = load(model_dir)
    with torch.no_grad():
        f32 = model(input_ids=ids, use_cache=False).logits[0].float()
        quantize_like_llmarch(model)
        q8 = model(input_ids=ids, use_cache=False).logits[0].float()
    agree = lambda a, b: float((a.argmax(-1) == b.argmax(-1)).float().mean())  # noqa: E731
    print(json.dumps({
        "positions": len(prompt_ids),
        "llmarch_q8_0_vs_reference_q8_0": {"rel_rms": rel_rms(ours, q8), "max_abs": float((ours - q8).abs().max()),
                                           "argmax_agreement": agree(ours, q8)},
        "reference_q8_0_vs_reference_f32": {"rel_rms": rel_rms(q8, f32), "argmax_agreement": agree(q8, f32)},
        "llmarch_q8_0_vs_reference_f32": {"rel_rms": rel_rms(ours, f32), "argmax_agreement": agree(ours, f32)},
    }, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="subset of output names")
    ap.add_argument("--format", choices=sorted(ROUND), default="q8_0", help="GGML block format (default q8_0)")
    ap.add_argument("--bench", metavar="MODEL_DIR", help="compare llmarch's q8_0 logits (--logits) on MODEL_DIR")
    ap.add_argument("--prompt-ids", help="with --bench: the comma-separated ids llmarch was run on")
    ap.add_argument("--logits", help="with --bench: llmarch's --logits-out file")
    args = ap.parse_args()
    global FORMAT
    FORMAT = args.format
    if transformers.__version__ != "5.23.0":
        raise SystemExit(f"transformers {transformers.__version__}: the reference is 5.23.0")
    if args.bench:
        if not (args.prompt_ids and args.logits):
            raise SystemExit("--bench needs --prompt-ids and --logits")
        return bench(args.bench, [int(t) for t in args.prompt_ids.split(",")], args.logits)
    for name, fixture in FIXTURES:
        if args.only and name not in args.only:
            continue
        make(name, fixture)


if __name__ == "__main__":
    main()
