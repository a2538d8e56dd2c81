#!/usr/bin/env python3
"""Tiny random Gemma 4 assistant drafters (`Gemma4AssistantForCausalLM`) and what they draft.

Run from the repository root, with transformers 5.25.0 on the path (5.23.0 cannot build an
assistant whose layers are all KV-shared: `Gemma4TextConfig.kv_sharing_modes` raises "The set of
layer types producing a cache is different..."; 5.25.0 can, and its gemma4_assistant code is
otherwise the same):

    /work/oracle-env/venv/bin/pip install --no-deps --target /work/tf525 transformers==5.25.0
    PYTHONPATH=/work/tf525 /work/oracle-env/venv/bin/python tests/oracle/gemma4_assistant_fixtures.py

For each variant (ordered embeddings off and on) this script
  1. loads the target, the existing fixture `tests/fixtures/gemma4/e2b-like` (made by
     gemma4_fixtures.py; 6 layers, window 8, the last 3 layers KV-shared, so layers 1 (sliding)
     and 2 (full) are the last owners of each type: what an assistant reads),
  2. builds a tiny assistant for it (3 layers, all KV-shared, sliding window 3, hidden 16 against
     the target's 32), randomises EVERY parameter and buffer (norm scales and layer scalars as
     1 + N(0, 0.2), other weights N(0, 0.2), `token_ordering` a random permutation of the
     vocabulary), saves it with `save_pretrained` and reloads it,
  3. prefills the target on a 13-token prompt (past its window of 8) with
     `output_hidden_states` and `return_shared_kv_states`, takes its greedy first token, then
     drafts DRAFTS tokens exactly as `SinglePositionMultiTokenCandidateGenerator.get_candidates`
     does in its first round (position = prompt length, the target's scaled embedding of the last
     token beside its last hidden state, then the assistant's projected state),
  4. writes `reference.json` (prompt, first token, drafted ids) and `reference.safetensors`
     (`logits`: one row per drafted token, in the order drafted) into the variant folder.
Deterministic: fixed seeds, CPU, one thread.
"""

import json
import os
import shutil
import sys

import safetensors.torch
import torch
import transformers
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    GenerationConfig,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

if transformers.__version__ != "5.25.0":
    raise SystemExit(f"transformers {transformers.__version__}: run with transformers 5.25.0 (see the header)")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4", "e2b-like")
OUT_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4_assistant")
PROMPT = [2, 300, 301, 302, 303, 304, 305, 306, 300, 301, 302, 303, 304]  # 13 tokens, BOS first
DRAFTS = 4
VARIANTS = {
    # name: (use_ordered_embeddings, seed, num_assistant_tokens in generation_config.json)
    "plain": (False, 1, 3),
    "ordered": (True, 2, 5),
}
SCALE_STD, WEIGHT_STD = 0.2, 0.2


def assistant_config(target_cfg, ordered):
    text = Gemma4TextConfig(
        vocab_size=target_cfg.vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,  # the target's (e2b-like)
        head_dim=16,  # the target's sliding layers' head_dim
        global_head_dim=32,  # the target's full layers' head_dim (its per_layer_config)
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=3,
        sliding_window=3,
        max_position_embeddings=target_cfg.max_position_embeddings,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
        final_logit_softcapping=None,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=[1, 106],
    )
    return Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=target_cfg.hidden_size,
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
        tie_word_embeddings=True,
    )


@torch.no_grad()
def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    mult = set()
    for mname, mod in model.named_modules():
        kind = type(mod).__name__
        if kind == "Gemma4RMSNorm" and getattr(mod, "with_scale", False):
            mult.add(f"{mname}.weight")
        elif kind == "Gemma4TextDecoderLayer":
            mult.add(f"{mname}.layer_scalar")
    seen = set()
    for name, t in sorted(model.state_dict().items()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        if name.endswith("token_ordering"):
            t.copy_(torch.randperm(t.numel(), generator=g))
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        t.copy_((1.0 + SCALE_STD * noise if name in mult else WEIGHT_STD * noise).to(t.dtype))


@torch.no_grad()
def main():
    target = Gemma4ForCausalLM.from_pretrained(
        TARGET, dtype=torch.float32, attn_implementation="eager", use_kernels=False
    ).eval()
    tcfg = target.config
    for name, (ordered, seed, num_tokens) in VARIANTS.items():
        out_dir = os.path.join(OUT_ROOT, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        torch.manual_seed(seed)
        model = Gemma4AssistantForCausalLM(assistant_config(tcfg, ordered)).eval()
        randomize(model, seed)
        model.save_pretrained(out_dir)
        GenerationConfig(num_assistant_tokens=num_tokens, num_assistant_tokens_schedule="constant").save_pretrained(out_dir)
        assistant = Gemma4AssistantForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, attn_implementation="eager", use_kernels=False
        ).eval()

        # The target's prefill, and its greedy first token.
        ids = torch.tensor([PROMPT])
        out = target(
            input_ids=ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True
        )
        first = int(out.logits[0, -1].argmax())
        assert first not in tcfg.eos_token_id, "the first token ends generation: pick another prompt"
        input_ids = torch.tensor([PROMPT + [first]])
        # As get_candidates does in its first round.
        current_length = input_ids.shape[1]
        shared = {k: (v[0][:, :, :current_length, :], v[1][:, :, :current_length, :]) for k, v in out.shared_kv_states.items()}
        last_hidden = out.hidden_states[-1][:, -1:]
        last_token = input_ids[:, -1:]
        position_ids = torch.tensor([[current_length - 1]])
        mask = torch.ones_like(input_ids)
        rows, drafted = [], []
        for _ in range(DRAFTS):
            emb = target.get_input_embeddings()(last_token)
            o = assistant(
                inputs_embeds=torch.cat([emb, last_hidden], dim=-1),
                attention_mask=mask,
                position_ids=position_ids,
                shared_kv_states=shared,
                use_cache=False,
            )
            last_token = o.logits.argmax(dim=-1)
            last_hidden = o.last_hidden_state
            rows.append(o.logits[0, 0].clone())
            drafted.append(int(last_token))
        logits = torch.stack(rows)
        safetensors.torch.save_file({"logits": logits.contiguous()}, os.path.join(out_dir, "reference.safetensors"))
        ref = {
            "generator": "tests/oracle/gemma4_assistant_fixtures.py",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
            "target": "gemma4/e2b-like",
            "use_ordered_embeddings": ordered,
            "seed": seed,
            "prompt_ids": PROMPT,
            "first_token": first,
            "drafted_ids": drafted,
            "draft_position": current_length - 1,
            "shared_kv_lengths": {k: int(v[0].shape[2]) for k, v in shared.items()},
        }
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            f.write(compact_json.dumps(ref))
            f.write("\n")
        print(name, "first", first, "drafted", drafted, "kv", ref["shared_kv_lengths"])


if __name__ == "__main__":
    main()
