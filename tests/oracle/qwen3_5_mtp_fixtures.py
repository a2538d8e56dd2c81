#!/usr/bin/env python3
"""Qwen3.5 / Qwen3.6 MTP-head fixtures: the tiny `qwen3_5` checkpoints with a random `mtp.*` head
added, and the draft logits the head gives (what `llmarch run --draft mtp --draft-logits-out` must
reproduce).

Run from the repository root, after qwen3_5_fixtures.py:

    /work/oracle-env/venv/bin/python tests/oracle/qwen3_5_mtp_fixtures.py   # -> tests/fixtures/qwen3_5_mtp/

transformers 5.23.0 has no MTP module (Qwen3_5ForCausalLM drops `mtp.*` on load), so the head is
assembled here from transformers 5.23.0's own building blocks, wired as vLLM's
`model_executor/models/qwen3_5_mtp.py` (`Qwen3_5MultiTokenPredictor.forward`) and its MTP proposer
(`v1/spec_decode/eagle.py`) do:

    e   = pre_fc_norm_embedding(embed_tokens(x[p+1]))     (the target's embedding table)
    h   = pre_fc_norm_hidden(hidden[p])                    (the target's last_hidden_state: final-normed)
    y   = layer(fc(cat([e, h], -1)), position p)           (a `full_attention` decoder layer of the
                                                            target's kind, dense or MoE, causal over
                                                            the head's own earlier positions)
    out = norm(y);  logits = lm_head(out)                  (the target's head)

where every norm is `Qwen3_5RMSNorm` / `Qwen3_5MoeRMSNorm` (1 + w), `fc` is Linear(2·hidden → hidden, no
bias) and the layer is the reference's `Qwen3_5DecoderLayer` / `Qwen3_5MoeDecoderLayer` built for index
`num_hidden_layers` of a config whose `layer_types` gain one `full_attention` entry, with the
reference's rotary embedding (text positions expanded to the 3 mRoPE rows) and eager attention under an
additive causal mask.

For each variant (`dense` from tests/fixtures/qwen3_5/dense, f32; `moe` from tests/fixtures/qwen3_5/moe,
bf16) the script
  1. loads the target with `from_pretrained(dtype=float32)`,
  2. builds the head and randomises EVERY parameter: norm weights N(0, 0.2) (used as 1 + w), everything
     else N(0, 0.2); `moe` rounds them to bf16 (and computes in f32 from the rounded values),
  3. writes tests/fixtures/qwen3_5_mtp/<variant>/: the target's files with `mtp.*` tensors added to
     model.safetensors (names as the Hub checkpoints have them: `mtp.fc.weight`,
     `mtp.pre_fc_norm_embedding.weight`, `mtp.pre_fc_norm_hidden.weight`, `mtp.norm.weight`,
     `mtp.layers.0.<decoder layer names>`),
  4. checks that the reloaded target (which drops `mtp.*`) still gives the same logits,
  5. drafts the first round from the PROMPT (the target's 23-token reference prompt): the target's
     forward gives hidden[0..n) and its greedy next token x[n]; the head runs positions 0..n-1 with
     tokens x[1..n] (its cache) and its row n-1 drafts d1; then draft j feeds (d_j, out_{j-1}) at
     position n-1+j. Each step is computed as one causal forward over every head position so far
     (equal to the incremental cache),
  6. writes reference.safetensors (`logits` [DRAFTS, vocab] f32, one row per drafted token) and
     reference.json (`prompt_ids`, `first_token`, `drafted_ids`, margins).

The weight seed is the first >= the base seed whose drafted ids all have a top-1/top-2 logit margin >=
MIN_MARGIN (so the ids do not hinge on rounding). Deterministic: fixed seeds, CPU, one thread.

--bench DIR: writes qwen3_5_fixtures.py's ~0.54 B Qwen3.6-shaped bench checkpoint (its `cfg_bench`, f32, not
timed) to DIR with a random MTP head added (weights N(0, 0.02) as the bench's, norms 0), for timing `--draft mtp`
(bench/README.md):

    /work/oracle-env/venv/bin/python tests/oracle/qwen3_5_mtp_fixtures.py --bench /work/bench-qwen-mtp
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import AutoModelForCausalLM

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures")
DRAFTS = 4
MIN_MARGIN = 0.02
VARIANTS = {"dense": (1000, "qwen3_5"), "moe": (2000, "qwen3_5_moe")}

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def layer_classes(kind):
    if kind == "qwen3_5":
        from transformers.models.qwen3_5 import modeling_qwen3_5 as m

        return m.Qwen3_5DecoderLayer, m.Qwen3_5RMSNorm
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    return m.Qwen3_5MoeDecoderLayer, m.Qwen3_5MoeRMSNorm


class MtpHead(torch.nn.Module):
    def __init__(self, config, kind):
        super().__init__()
        Layer, Norm = layer_classes(kind)
        cfg = config.__class__.from_dict(config.to_dict())
        cfg.layer_types = list(config.layer_types) + ["full_attention"]
        cfg.num_hidden_layers = config.num_hidden_layers + 1
        cfg._attn_implementation = "eager"
        cfg._experts_implementation = getattr(config, "_experts_implementation", None) or "eager"
        h, eps = config.hidden_size, config.rms_norm_eps
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        self.layers = torch.nn.ModuleList([Layer(cfg, config.num_hidden_layers)])
        self.norm = Norm(h, eps=eps)
        self.pre_fc_norm_hidden = Norm(h, eps=eps)
        self.pre_fc_norm_embedding = Norm(h, eps=eps)

    def forward(self, target, next_ids, hidden):
        """next_ids [L] (the token after each position), hidden [L, H] -> normed outputs [L, H]."""
        L = next_ids.shape[0]
        e = self.pre_fc_norm_embedding(target.model.embed_tokens(next_ids[None]))
        h = self.pre_fc_norm_hidden(hidden[None])
        x = self.fc(torch.cat([e, h], dim=-1))
        pos = torch.arange(L).view(1, 1, -1).expand(3, 1, -1)
        pe = target.model.rotary_emb(x, pos)
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        y = self.layers[0](x, position_embeddings=pe, attention_mask=mask, position_ids=pos[0])
        return self.norm(y)[0]


def randomise(head, seed, bf16):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.2
            if bf16:
                v = v.to(torch.bfloat16).to(torch.float32)
            p.copy_(v)


def draft(head, target, prompt):
    with torch.no_grad():
        out = target.model(torch.tensor([prompt]))
        hidden = out.last_hidden_state[0]  # [n, H], final-normed
        first = int(target.lm_head(hidden[-1]).argmax())
        next_ids = list(prompt[1:]) + [first]
        rows, logits, drafted = hidden, [], []
        for j in range(DRAFTS):
            outs = head(target, torch.tensor(next_ids), rows)
            row = target.lm_head(outs[-1]).float()
            logits.append(row)
            d = int(row.argmax())
            drafted.append(d)
            next_ids.append(d)
            rows = torch.cat([rows, outs[-1:]], dim=0)
        return first, torch.stack(logits), drafted


def margins(logits):
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def main():
    for variant, (base_seed, kind) in VARIANTS.items():
        src = os.path.join(ROOT, "qwen3_5", variant)
        out = os.path.join(ROOT, "qwen3_5_mtp", variant)
        ref = json.load(open(os.path.join(src, "reference.json")))
        prompt = ref["prompt_ids"]
        target = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        cfg = target.config
        bf16 = variant == "moe"
        rejected = []
        for seed in range(base_seed, base_seed + 200):
            torch.manual_seed(seed)
            head = MtpHead(cfg, kind).eval()
            randomise(head, seed, bf16)
            first, logits, drafted = draft(head, target, prompt)
            m = margins(logits)
            if min(m) >= MIN_MARGIN:
                break
            rejected.append(seed)
        else:
            sys.exit(f"{variant}: no seed gives margins >= {MIN_MARGIN}")
        # The checkpoint: the target's tensors plus the head's, named as the Hub's.
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(src):
            if f not in ("reference.json", "reference.safetensors", "model.safetensors"):
                shutil.copy(os.path.join(src, f), out)
        tensors = load_file(os.path.join(src, "model.safetensors"))
        dtype = torch.bfloat16 if bf16 else torch.float32
        for name, t in head.state_dict().items():
            tensors["mtp." + name] = t.detach().to(dtype).contiguous()
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        # The reloaded target ignores the head and gives the same logits.
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            a = target(torch.tensor([prompt])).logits
            b = again(torch.tensor([prompt])).logits
        assert torch.equal(a, b), "the reloaded target differs"
        save_file({"logits": logits.contiguous()}, os.path.join(out, "reference.safetensors"))
        meta = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "source_fixture": f"qwen3_5/{variant}",
            "seed": seed,
            "rejected_seeds": rejected,
            "prompt_ids": prompt,
            "first_token": first,
            "drafted_ids": drafted,
            "draft_margins": m,
            "mtp_tensors": sorted("mtp." + n for n in head.state_dict()),
        }
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        print(f"{variant}: seed {seed}, first {first}, drafted {drafted}, margins {[round(x, 3) for x in m]}")


def make_bench(d):
    """The Qwen3.6-shaped bench checkpoint of qwen3_5_fixtures.py, plus a random MTP head."""
    sys.path.insert(0, os.path.dirname(__file__))
    import qwen3_5_fixtures as q
    import gemma4_fixtures as g4

    os.makedirs(d, exist_ok=True)
    torch.manual_seed(q.BENCH_SEED)
    model = q.Qwen3_5MoeForCausalLM(q.cfg_bench()).float().eval()
    q.randomize(model, q.BENCH_SEED, False, weight_std=q.BENCH_WEIGHT_STD)
    head = MtpHead(model.config, "qwen3_5_moe").eval()
    g = torch.Generator().manual_seed(q.BENCH_SEED + 1)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.zeros(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * q.BENCH_WEIGHT_STD)
    model.save_pretrained(d)
    tok = g4.build_tokenizer(g4.BENCH_VOCAB_SIZE)
    g4.write_tokenizer_files(d, tok, model_max_length=4096)
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert files == ["model.safetensors"], files
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    for name, t in head.state_dict().items():
        tensors["mtp." + name] = t.detach().contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {d}: {n} parameters with the MTP head")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bench":
        make_bench(sys.argv[2])
    else:
        main()
