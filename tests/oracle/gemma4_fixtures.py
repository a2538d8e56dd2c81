#!/usr/bin/env python3
"""Tiny random Gemma 4 checkpoints, a tiny trained tokenizer, and the reference outputs.

Run from the repository root:

    /work/oracle-env/venv/bin/python tests/oracle/gemma4_fixtures.py            # -> tests/fixtures/gemma4/
    /work/oracle-env/venv/bin/python tests/oracle/gemma4_fixtures.py --bench /work/bench-model

Default mode: for every variant in VARIANTS this script
  1. trains (once) a tiny byte-fallback BPE tokenizer with the `tokenizers` library on the
     English text in CORPUS, with Gemma's special tokens at Gemma's ids (SPECIAL_TOKENS),
  2. builds the variant's config and model, randomises EVERY saved parameter and buffer
     (multiplicative scales as 1 + N(0, 0.2), everything else N(0, 0.2)), and writes a complete
     model folder with `save_pretrained` (+ tokenizer files, generation_config.json),
  3. reloads that folder with `from_pretrained` (so the reference is what the files say),
  4. runs greedy `generate(use_cache=True)` from a fixed prompt to 33 tokens (window 8), then
     ONE full forward without a cache over the final sequence, and records the logits, the
     generated ids, the reference's KV-cache bytes after generation and a few cross-checks,
  5. writes `reference.safetensors` + `reference.json` into the variant folder.
A variant's weight seed is the first seed >= its base seed for which the greedy continuation
contains no EOS (and, for the wrapper, no multimodal placeholder id), is varied (>= 12 distinct
ids of 20, no id more than 3 times in a row), and every greedy decision has a top-1/top-2 logit
margin >= MIN_MARGIN (so a 5e-3 logit error cannot flip a token).

--bench DIR: writes a ~0.2 B-parameter random E2B-shaped checkpoint (f32, vocab 32768) with the
same tokenizer padded by unused tokens, then times transformers on it (see README).

Deterministic: fixed seeds, CPU, torch.set_num_threads(1) for the fixtures; two runs give
byte-identical files. See tests/oracle/README.md ("Gemma 4 model fixtures").
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections import OrderedDict

import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compact_json  # noqa: E402
from measure_cache import describe_cache  # noqa: E402  (same cache walk as reference_cache.json)

# Pinned versions (the fixtures were produced with exactly these).
PINNED = {
    "transformers": "5.23.0",
    "torch": "2.15.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
}

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures", "gemma4")
TEMPLATE_PATH = "/work/shared/templates/gemma-4-E2B-it.jinja"

S, F = "sliding_attention", "full_attention"

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

VOCAB_SIZE = 512  # tokenizer and model vocabulary (tiny fixtures)
BENCH_VOCAB_SIZE = 32768  # bench checkpoint: the same tokenizer padded with <unused…> tokens

# Gemma's special tokens at Gemma's ids. 0-3, 46-52, 105, 106 and "\n" = 107 are the ids of the
# real Gemma 4 vocabulary (48/49 inferred from their neighbours); 100/101 are reported by one
# third-party fixture; the rest are chosen here. Every other id below 107 is `<unusedN>`.
SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    102: "<|image|>",
    103: "<|audio|>",
    104: "<|video|>",
    105: "<|turn>",
    106: "<turn|>",
}
NUM_SPECIAL = 107  # ids 0..106 are special (named above or <unusedN>)
NEWLINE_ID = 107  # "\n" is an ordinary token at its Gemma id
BYTE_BASE = 108  # <0x00>..<0xFF> at 108..363
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
TURN_START_ID, TURN_END_ID = 105, 106
IMAGE_ID, AUDIO_ID, VIDEO_ID = 102, 103, 104
EOS_IDS = [EOS_ID, TURN_END_ID]

# Training text: a few KB of plain English, written for this script.
CORPUS = """\
The little robot lived in a small house near the river. Every morning it walked to the water
and counted the boats. There were three red boats, two blue boats and one old green boat.
The robot liked the green boat best, because it was slow and it made a soft sound.
One day the river was very quiet. The boats did not move. The robot sat on a stone and waited.
A bird came down from the tree and said: "Why are you waiting?" The robot said: "I am waiting
for the boats. They always come in the morning." The bird laughed and flew away.
After a long time the sun went behind the hills, and the robot went back to the house.
It opened the door, turned on the light and wrote in its book: "Today the river was quiet."
The next morning the boats were back. The robot was happy. It counted them again, one by one.
Some people think that a machine cannot be happy. The robot did not think about that.
It thought about the water, the light on the water, and the sound of the old green boat.
In the town there was a market with bread, apples, cheese and fresh fish. On Saturday the
robot went to the market with a basket. It bought two apples and a piece of bread for the bird.
The woman at the market asked: "Do you eat bread?" The robot said: "No, but my friend does."
She smiled and gave it one more apple. The robot said thank you and walked home slowly.
The weather changed in the autumn. The wind was cold and the rain came every day. The river
became wide and fast, and the boats stayed in the harbour. The robot cleaned its windows,
read old books and learned the names of the stars. It learned that light from a star can
travel for a thousand years before it reaches the eye. That made the robot think about time.
In the winter the river was white with ice. Children came with their parents to walk on it.
They were loud and they were happy, and the robot watched them from the window of its house.
A boy knocked on the door and asked if the robot wanted to play. The robot said yes.
They built a small house of snow with a door and a window, and they put a candle inside.
At night the snow house was bright like a lamp, and the people of the town came to see it.
When spring came back, the ice broke into large pieces and the water was loud again.
The first boat to come down the river was the old green boat. The robot waved, and the man
in the boat waved back. He said: "Good morning, my friend. Did you have a good winter?"
The robot said: "Yes. I learned the names of the stars, and I built a house of snow."
The man said: "That is a good winter." Then he went on down the river to the sea.
The robot often asked simple questions. What is the river? Where does the water go? Why is
the sky blue in the day and black at night? Some questions had answers in the books, and some
did not. The robot wrote all of them in its book, the answered ones and the open ones.
It kept the book on the table next to the window, so that it could see the river while it wrote.
Numbers were easy for the robot: 1, 2, 3, 10, 20, 100 and 1000. Words were harder, and the
words for feelings were the hardest of all. But every year the robot knew a few more of them.
"""

TINY_PROMPT_TEXT = "The robot and the boat ☕ on the river"  # 13 ids with BOS; ☕ -> 3 byte tokens
BENCH_PROMPT_TOKENS = 64
BENCH_NEW_TOKENS = 32


def special_token_table(num_special=NUM_SPECIAL):
    table = {}
    unused = 0
    for i in range(num_special):
        if i in SPECIAL_TOKENS:
            table[i] = SPECIAL_TOKENS[i]
        else:
            table[i] = f"<unused{unused}>"
            unused += 1
    return table


def build_tokenizer(vocab_size=VOCAB_SIZE):
    """BPE with byte fallback, SentencePiece style (`▁` for spaces, no prefix space, <0xNN>
    byte tokens), Gemma's specials at fixed ids. For vocab_size > VOCAB_SIZE the extra ids are
    `<unusedN>` special tokens (the trained part stays the same)."""
    # 1. Train the merges on the corpus (words split at spaces, `▁` kept at the word start).
    n_trained = VOCAB_SIZE - BYTE_BASE - 256
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained,
        min_frequency=2,
        show_progress=False,
        limit_alphabet=48,  # rarer characters (some capitals, digits, punctuation) use the byte tokens
        special_tokens=[],
    )
    lines = CORPUS.replace("\n", " ").split(". ")
    trainer_tok.train_from_iterator(lines, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    trained_vocab = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    # 2. Assemble the final vocabulary: specials, "\n", bytes, trained tokens, padding.
    specials = special_token_table()
    vocab = {tok: i for i, tok in specials.items()}
    vocab["\n"] = NEWLINE_ID
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = BYTE_BASE + b
    for tok, _ in trained_vocab:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    extra = []
    unused = sum(1 for t in specials.values() if t.startswith("<unused"))
    while len(vocab) < vocab_size:
        name = f"<unused{unused}>"
        unused += 1
        vocab[name] = len(vocab)
        extra.append(name)
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    assert sorted(vocab.values()) == list(range(vocab_size))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", BOS_ID)]
    )
    added = [specials[i] for i in range(NUM_SPECIAL)] + extra
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    for i, t in specials.items():
        assert tok.token_to_id(t) == i, (t, i)
    return tok


def check_tokenizer(tok):
    """Round trips (byte fallback covers any UTF-8) and the special ids."""
    samples = [
        TINY_PROMPT_TEXT,
        "Über naïve café: ☕ 🤖 — ½ 漢字\n\ttab  two spaces",
        "<|turn>user\nHello<turn|>\n<|turn>model\n",
    ]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        assert back == s, (s, back, ids)
    enc = tok.encode("<|turn>user\nHi<turn|>", add_special_tokens=True).ids
    assert enc[0] == BOS_ID and enc[1] == TURN_START_ID and enc[-1] == TURN_END_ID, enc
    assert tok.encode("é", add_special_tokens=False).ids == [BYTE_BASE + 0xC3, BYTE_BASE + 0xA9]


def tokenizer_config(template):
    return OrderedDict(
        tokenizer_class="GemmaTokenizer",
        add_bos_token=True,
        add_eos_token=False,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=[t for i, t in sorted(SPECIAL_TOKENS.items()) if i > 4],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
        chat_template=template,
    )


def generation_config():
    return OrderedDict(
        bos_token_id=BOS_ID,
        do_sample=False,
        eos_token_id=EOS_IDS,
        pad_token_id=PAD_ID,
        transformers_version=transformers.__version__,
    )


def write_tokenizer_files(d, tok, model_max_length=256):
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        template = f.read()
    tok.save(os.path.join(d, "tokenizer.json"), pretty=False)
    cfg = tokenizer_config(template)
    cfg["model_max_length"] = model_max_length
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(d, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(), f, indent=2)
        f.write("\n")


def check_tokenizer_folder(d, tok):
    """transformers' AutoTokenizer (GemmaTokenizer rebuilds its own pipeline from vocab/merges)
    must give exactly the ids of the raw tokenizers file, and render the chat template."""
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for s in [TINY_PROMPT_TEXT, CORPUS[:400], "Über naïve café: ☕ 🤖\n\n  x", "<|turn>user\nHi<turn|>"]:
        a = hf(s)["input_ids"]
        b = tok.encode(s, add_special_tokens=True).ids
        assert a == b, (s, a, b)
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n", repr(chat)


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


def gemma_rope():
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


def text_config(**overrides):
    from transformers import Gemma4TextConfig

    kw = dict(
        vocab_size=VOCAB_SIZE,
        vocab_size_per_layer_input=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        layer_types=[S, S, F, S, S, F],
        sliding_window=8,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        max_position_embeddings=256,
        rope_parameters=gemma_rope(),
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return Gemma4TextConfig(**kw)


def cfg_e2b_like():
    # E2B in miniature: 1 KV head, PLE, the last 3 layers (S, S, F) reuse the KV of layer 1 (S)
    # and layer 2 (F), double-wide MLP on those shared layers.
    return text_config(num_kv_shared_layers=3, hidden_size_per_layer_input=8, use_double_wide_mlp=True)


def cfg_e4b_like():
    # E4B in miniature: 2 KV heads, PLE, the last 2 layers (S, F) reuse layer 3 (S) and
    # layer 2 (F); normal-width MLP everywhere.
    return text_config(num_key_value_heads=2, num_kv_shared_layers=2, hidden_size_per_layer_input=8)


def cfg_moe_keqv():
    # 26B-A4B in miniature: K=V on the full layers with fewer global KV heads (1) than sliding
    # ones (2); dense MLP + MoE block (4 experts, top-2) on every layer; no PLE, no sharing.
    return text_config(
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=8,
    )


def cfg_dense_keqv():
    # 31B in miniature: dense, K=V on the full layers (2 global KV heads), 4 KV heads on the
    # sliding layers (no GQA there), no PLE, tied embeddings.
    return text_config(num_key_value_heads=4, num_global_key_value_heads=2, attention_k_eq_v=True)


def cfg_wrapper():
    # Gemma4ForConditionalGeneration around an E2B-like text model (7 layers, the last 3 — S, S, F —
    # reuse layer 2 (S) and layer 3 (F)), plus tiny vision and audio towers whose tensors a
    # text-only loader must skip.
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    text = text_config(
        num_hidden_layers=7,
        layer_types=[S, S, S, F, S, S, F],
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=8,
        use_double_wide_mlp=True,
    )
    vision = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=2,
        position_embedding_size=8,
        pooling_kernel_size=2,
    )
    audio = Gemma4AudioConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[4, 4],
        output_proj_dims=16,
        conv_kernel_size=3,
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_id=IMAGE_ID,
        audio_token_id=AUDIO_ID,
        video_token_id=VIDEO_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=PAD_ID,
    )


VARIANTS = OrderedDict(
    [
        (
            "e2b-like",
            dict(
                config=cfg_e2b_like,
                cls="Gemma4ForCausalLM",
                dtype="float32",
                seed=1000,
                covers="E2B: PLE, KV sharing of both layer types (layers 3,4,5 reuse 1 (S), 2 (F)), "
                "double-wide MLP on the shared layers, 1 KV head, softcap 30, f32, one model.safetensors",
            ),
        ),
        (
            "e4b-like",
            dict(
                config=cfg_e4b_like,
                cls="Gemma4ForCausalLM",
                dtype="float32",
                seed=2000,
                extra_shared_kv=True,
                covers="E4B: PLE, KV sharing (layers 4,5 reuse 3 (S), 2 (F)), 2 KV heads, normal MLP; the "
                "file also carries unused k_proj/v_proj/k_norm tensors for the shared layers (the "
                "reference ignores them; a loader must tolerate them)",
            ),
        ),
        (
            "moe-keqv",
            dict(
                config=cfg_moe_keqv,
                cls="Gemma4ForCausalLM",
                dtype="float32",
                seed=3000,
                covers="26B-A4B: K=V full layers (no v_proj, 1 global KV head x 32) vs 2 sliding KV heads "
                "x 16, dense MLP + MoE (4 experts, top-2, router scale + per_expert_scale), no PLE",
            ),
        ),
        (
            "dense-keqv",
            dict(
                config=cfg_dense_keqv,
                cls="Gemma4ForCausalLM",
                dtype="float32",
                seed=4000,
                covers="31B: dense, K=V full layers (2 global KV heads x 32), 4 sliding KV heads x 16 "
                "(no GQA on sliding layers), no PLE, tied embeddings",
            ),
        ),
        (
            "wrapper-bf16-sharded",
            dict(
                config=cfg_wrapper,
                cls="Gemma4ForConditionalGeneration",
                dtype="bfloat16",
                seed=5000,
                max_shard_size="150KB",
                covers="Gemma4ForConditionalGeneration: text weights under model.language_model.*, tiny "
                "vision + audio towers (model.vision_tower.*, model.audio_tower.*, model.embed_vision.*, "
                "model.embed_audio.*) to skip, bf16 weights, sharded with model.safetensors.index.json; "
                "text: PLE, KV sharing (layers 4,5,6 reuse 2 (S), 3 (F)), double-wide MLP",
            ),
        ),
    ]
)

MAX_NEW_TOKENS = 20  # prompt (13 ids with BOS) + 20 = 33 tokens, more than four windows of 8
MIN_MARGIN = 0.02  # top-1 minus top-2 logit at every greedy decision
MIN_DISTINCT = 12  # distinct ids among the 20 generated
MAX_RUN = 3  # longest run of one repeated id
MAX_SEED_TRIES = 200
WEIGHT_STD = 0.2
SCALE_STD = 0.2


# --------------------------------------------------------------------------------------
# Randomisation
# --------------------------------------------------------------------------------------


def multiplicative_names(model):
    """State-dict names that multiply activations, randomised around 1: the weight of every
    Gemma4RMSNorm that has one (Gemma 4 uses `x_normed * w`, no `1 + w`), layer_scalar, the
    router's `scale` and `per_expert_scale`."""
    names = set()
    for mname, mod in model.named_modules():
        kind = type(mod).__name__
        if kind == "Gemma4RMSNorm" and getattr(mod, "with_scale", False):
            names.add(f"{mname}.weight")
        elif kind == "Gemma4TextRouter":
            names.update({f"{mname}.scale", f"{mname}.per_expert_scale"})
        elif kind == "Gemma4TextDecoderLayer":
            names.add(f"{mname}.layer_scalar")
        elif kind == "Gemma4VisionModel" and getattr(mod.config, "standardize", False):
            names.add(f"{mname}.std_scale")
    return names


@torch.no_grad()
def randomize(model, seed, weight_std=WEIGHT_STD, scale_std=SCALE_STD):
    """Overwrite every tensor of the state dict (parameters and persistent buffers) with seeded
    random values. Returns {kind: [names]} for the README/notes."""
    g = torch.Generator().manual_seed(seed)
    mult = multiplicative_names(model)
    sd = model.state_dict()
    seen = set()
    kinds = {"scale": [], "clip": [], "weight": []}
    for name in sorted(sd):
        t = sd[name]
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied lm_head -> embed_tokens
            continue
        seen.add(ptr)
        if not t.is_floating_point():
            raise SystemExit(f"unexpected non-float state tensor {name} {t.dtype}")
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name in mult:
            val = 1.0 + scale_std * noise
            kinds["scale"].append(name)
        elif name.endswith(("_min", "_max")) and t.dim() == 0:
            # Gemma4ClippableLinear clamp bounds (audio tower only): finite, symmetric-ish.
            mag = 4.0 + noise.abs()
            val = -mag if name.endswith("_min") else mag
            kinds["clip"].append(name)
        else:
            val = weight_std * noise
            kinds["weight"].append(name)
        t.copy_(val.to(t.dtype))
    # Nothing may be left at its init value: no constant tensor, no scalar equal to 0 or 1.
    for name, t in model.state_dict().items():
        flat = t.float().flatten()
        if flat.numel() > 1:
            assert flat.std() > 0, f"{name} is constant"
        else:
            assert float(flat[0]) not in (0.0, 1.0), f"{name} kept its init value"
    return kinds


def check_norm_formula():
    """Gemma4RMSNorm computes x / rms(x) * w (plain w, unlike Gemma 1-3's 1 + w)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    torch.manual_seed(0)
    m = Gemma4RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(torch.randn(8))
    x = torch.randn(3, 8)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    out = m(x)
    plain = (out - normed * m.weight).abs().max().item()
    one_plus = (out - normed * (1 + m.weight)).abs().max().item()
    assert plain < 1e-5 < one_plus, (plain, one_plus)
    return "x * (mean(x^2) + eps)^-1/2 * w (plain w, no 1 + w)"


# --------------------------------------------------------------------------------------
# Building, saving, reloading
# --------------------------------------------------------------------------------------


def build_model(spec, seed):
    cfg = spec["config"]()
    cls = getattr(transformers, spec["cls"])
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    kinds = randomize(model, seed)
    return model, kinds


def text_cfg_of(model):
    return model.config.get_text_config()


def inject_shared_kv_tensors(d, text_cfg, seed):
    """Add k_proj / v_proj / k_norm weights for the KV-shared layers to model.safetensors (some
    real checkpoints carry them; the reference ignores them via _keys_to_ignore_on_load_unexpected)."""
    path = os.path.join(d, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    g = torch.Generator().manual_seed(seed + 7)
    added = []
    for i, mode in enumerate(text_cfg.kv_sharing_modes):
        if mode != "reuse":
            continue
        plc = text_cfg.per_layer_config[i]
        kv, hd = plc.num_key_value_heads, plc.head_dim
        pre = f"model.layers.{i}.self_attn."
        tensors[pre + "k_proj.weight"] = WEIGHT_STD * torch.randn(kv * hd, text_cfg.hidden_size, generator=g)
        tensors[pre + "v_proj.weight"] = WEIGHT_STD * torch.randn(kv * hd, text_cfg.hidden_size, generator=g)
        tensors[pre + "k_norm.weight"] = 1.0 + SCALE_STD * torch.randn(hd, generator=g)
        added += [pre + "k_proj.weight", pre + "v_proj.weight", pre + "k_norm.weight"]
    safetensors.torch.save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})
    return added


def save_variant(name, spec, model, tok):
    d = os.path.join(OUT_ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    kwargs = {}
    if "max_shard_size" in spec:
        kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(d, **kwargs)
    write_tokenizer_files(d, tok)  # also overwrites generation_config.json
    return d


def state_dicts_equal(a, b):
    bad = []
    for k in a:
        if k not in b:
            bad.append(f"{k} missing after reload")
        elif not torch.equal(a[k].float(), b[k].float()):
            bad.append(f"{k} differs after reload")
    return bad


def load(d, cls_name, dtype):
    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(d, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, errors
    return model.eval(), problems


# --------------------------------------------------------------------------------------
# Reference run
# --------------------------------------------------------------------------------------


def top2_margins(logits):
    top = torch.topk(logits, 2, dim=-1).values
    return top[:, 0] - top[:, 1]


@torch.no_grad()
def reference_run(model, prompt_ids, max_new_tokens):
    """Greedy generate with the default cache, then one full forward (no cache) over the final
    sequence. Returns a dict of everything recorded."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    seq = out.sequences[0]
    generated = seq[len(prompt_ids) :].tolist()
    full = model(input_ids=seq[None], use_cache=False).logits[0].float()  # [T, V]
    p = len(prompt_ids)
    # logits of the cached path: step k predicts token p + k from position p - 1 + k
    step = torch.stack([x[0].float() for x in out.logits])  # [N, V]
    full_at_steps = full[p - 1 : p - 1 + len(generated)]
    argmax = full.argmax(-1)  # [T]
    mismatch = [p + k for k, t in enumerate(generated) if int(argmax[p - 1 + k]) != t]
    margins = top2_margins(full_at_steps)
    return dict(
        sequence=seq,
        generated=generated,
        logits=full,
        cache=out.past_key_values,
        step_max_abs_diff=float((step - full_at_steps).abs().max()),
        mismatch=mismatch,
        min_margin=float(margins.min()),
        finite=bool(torch.isfinite(full).all()),
    )


def longest_run(ids):
    best = cur = 1
    for a, b in zip(ids, ids[1:]):
        cur = cur + 1 if a == b else 1
        best = max(best, cur)
    return best


def acceptable(run, multimodal):
    """EOS-free, unambiguous and varied: random tied-embedding models like to repeat a token,
    and a window full of one token would hide a ring buffer that mixes up its slots."""
    gen = run["generated"]
    bad = set(EOS_IDS) | ({IMAGE_ID, AUDIO_ID, VIDEO_ID} if multimodal else set())
    return (
        run["finite"]
        and len(gen) == MAX_NEW_TOKENS
        and not (set(gen) & bad)
        and not run["mismatch"]
        and run["min_margin"] >= MIN_MARGIN
        and len(set(gen)) >= MIN_DISTINCT
        and longest_run(gen) <= MAX_RUN
    )


def make_variant(name, spec, tok, quiet=False):
    prompt_ids = tok.encode(TINY_PROMPT_TEXT, add_special_tokens=True).ids
    multimodal = spec["cls"] == "Gemma4ForConditionalGeneration"
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        model, kinds = build_model(spec, seed)
        probe = model.to(torch.bfloat16).float() if spec["dtype"] == "bfloat16" else model
        run = reference_run(probe, prompt_ids, MAX_NEW_TOKENS)
        if acceptable(run, multimodal):
            break
    else:
        raise SystemExit(f"{name}: no seed in {MAX_SEED_TRIES} tries gives an acceptable greedy run")

    in_memory = {k: v.clone() for k, v in model.state_dict().items()}
    d = save_variant(name, spec, model, tok)
    extra = []
    if spec.get("extra_shared_kv"):
        extra = inject_shared_kv_tensors(d, text_cfg_of(model), seed)

    # The reference is the reloaded folder, run in float32.
    ref, problems = load(d, spec["cls"], torch.float32)
    assert not problems, f"{name}: loading info {problems}"
    diff = state_dicts_equal(in_memory, ref.state_dict())
    assert not diff, f"{name}: {diff[:5]}"
    text_cfg = text_cfg_of(ref)
    run = reference_run(ref, prompt_ids, MAX_NEW_TOKENS)
    assert acceptable(run, multimodal), f"{name}: reloaded model differs from the probe"

    # Eager attention over the same sequence (default is sdpa): how far apart are they?
    eager, _ = load(d, spec["cls"], torch.float32)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        eager_logits = eager(input_ids=run["sequence"][None], use_cache=False).logits[0].float()
    eager_diff = float((eager_logits - run["logits"]).abs().max())

    layers, total, total_storage = describe_cache(run["cache"], text_cfg)
    cache_tokens = len(run["sequence"]) - 1  # the last generated token is never fed back

    tensors = OrderedDict(
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        generated_ids=torch.tensor(run["generated"], dtype=torch.int64),
        logits=run["logits"].contiguous(),
        cache_layer_bytes=torch.tensor([L["bytes"] for L in layers], dtype=torch.int64),
    )
    bf16_info = None
    if spec["dtype"] == "bfloat16":
        m16, problems16 = load(d, spec["cls"], torch.bfloat16)
        assert not problems16, problems16
        with torch.no_grad():
            l16 = m16(input_ids=run["sequence"][None], use_cache=False).logits[0]
        run16 = reference_run(m16, prompt_ids, MAX_NEW_TOKENS)
        tensors["logits_bf16"] = l16.contiguous()  # bfloat16, exactly what the bf16 model returned
        p = len(prompt_ids)
        am16 = l16.float().argmax(-1)
        bf16_info = OrderedDict(
            logits_bf16_max_abs_diff_vs_f32=float((l16.float() - run["logits"]).abs().max()),
            bf16_argmax_equals_sequence=[
                int(am16[p - 1 + k]) == t for k, t in enumerate(run["generated"])
            ].count(False)
            == 0,
            generated_ids_bf16=run16["generated"],
        )

    safetensors.torch.save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})

    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "reference.safetensors")
    notes = [
        spec["covers"] + ".",
        f"Weights: seed {seed}; {len(kinds['scale'])} multiplicative tensors (norm weights, layer_scalar, "
        f"router scale/per_expert_scale) = 1 + N(0, {SCALE_STD}); {len(kinds['weight'])} others = N(0, {WEIGHT_STD})"
        + (f"; {len(kinds['clip'])} audio clamp bounds = +-(4 + |N(0,1)|)" if kinds["clip"] else "")
        + ".",
        f"logits: ONE forward with use_cache=False over prompt + generated ({len(run['sequence'])} positions), "
        f"float32 (files are {spec['dtype']}, upcast on load); row i predicts token i + 1.",
        f"Greedy generate(use_cache=True) tokens equal the argmax of the full-forward logits at every position: "
        f"{not run['mismatch']}. Max |cached step logits - full-forward logits| = {run['step_max_abs_diff']:.3g}. "
        f"Min top-1/top-2 margin at the greedy decisions: {run['min_margin']:.4f}.",
        f"Max |eager - sdpa| full-forward logits: {eager_diff:.3g}.",
        f"KV cache after generate holds {cache_tokens} tokens (the last generated token is not fed): "
        f"{total} B in K/V tensors ({total_storage} B of underlying storage), f32.",
    ]
    if extra:
        notes.append(f"Unused tensors added for the shared layers: {len(extra)} ({extra[0]} ...).")
    doc = OrderedDict(
        generator="tests/oracle/gemma4_fixtures.py",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
        variant=name,
        **{"class": spec["cls"]},
        dtype=spec["dtype"],
        reference_dtype="float32",
        weight_files=shards,
        seed=seed,
        prompt_text=TINY_PROMPT_TEXT,
        prompt_ids=prompt_ids,
        generated_ids=run["generated"],
        eos_ids=EOS_IDS,
        max_new_tokens=MAX_NEW_TOKENS,
        sliding_window=text_cfg.sliding_window,
        cached_equals_full_argmax=not run["mismatch"],
        argmax_mismatch_positions=run["mismatch"],
        min_top2_margin=round(run["min_margin"], 6),
        cached_vs_full_max_abs_diff=float(f"{run['step_max_abs_diff']:.3g}"),
        eager_vs_sdpa_max_abs_diff=float(f"{eager_diff:.3g}"),
        cache=OrderedDict(
            tokens=cache_tokens,
            total_bytes=total,
            total_storage_bytes=total_storage,
            layers=[
                OrderedDict(
                    layer=L["decoder_layer"],
                    type=L["decoder_layer_type"],
                    kv_sharing_mode=L.get("kv_sharing_mode"),
                    cache_class=L["layer_class"],
                    bytes=L["bytes"],
                    shapes={t["name"]: t["shape"] for t in L["tensors"] if not t.get("bookkeeping")},
                )
                for L in layers
            ],
        ),
        unused_shared_kv_tensors=extra,
        notes=notes,
    )
    if bf16_info:
        doc["bf16"] = bf16_info
    compact_json.dump(doc, os.path.join(d, "reference.json"))
    if not quiet:
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(
            f"{name:<22} seed {seed} T={len(run['sequence'])} gen={run['generated']} margin={run['min_margin']:.3f} "
            f"cache={total} B files={size} B"
        )
    return doc


# --------------------------------------------------------------------------------------
# Bench checkpoint
# --------------------------------------------------------------------------------------


def cfg_bench():
    # E2B shape scaled to ~0.2 B parameters: 10 layers (S,S,S,S,F) x 2, the last 4 (S,S,S,F)
    # reuse layer 5 (S) and layer 4 (F); 4 heads x 256 on sliding, x 512 on full layers,
    # 1 KV head, window 512, PLE 128 per layer, double-wide MLP on shared layers, vocab 32768.
    layer_types = [F if i % 5 == 4 else S for i in range(10)]
    return text_config(
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


def time_transformers(d, threads, runs=3):
    torch.set_num_threads(threads)
    model = transformers.Gemma4ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = tok.encode(CORPUS, add_special_tokens=True).ids[:BENCH_PROMPT_TOKENS]
    assert len(ids) == BENCH_PROMPT_TOKENS
    prompt = torch.tensor([ids])
    prefill, decode = [], []
    with torch.no_grad():
        for r in range(runs + 1):  # the first run is a warm-up
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            t1 = time.perf_counter()
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            for _ in range(BENCH_NEW_TOKENS):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t3 = time.perf_counter()
            if r:
                prefill.append(BENCH_PROMPT_TOKENS / (t1 - t0))
                decode.append(BENCH_NEW_TOKENS / (t3 - t2))
    return OrderedDict(
        threads=threads,
        runs=runs,
        prompt_tokens=BENCH_PROMPT_TOKENS,
        new_tokens=BENCH_NEW_TOKENS,
        prefill_tok_s=round(statistics.median(prefill), 2),
        decode_tok_s=round(statistics.median(decode), 2),
        prefill_tok_s_all=[round(x, 2) for x in prefill],
        decode_tok_s_all=[round(x, 2) for x in decode],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        method="prefill = one forward over the 64 prompt ids with a DynamicCache; decode = 32 single-token "
        "forwards on that cache (greedy argmax), tok/s = 32 / their time; median of the runs after one warm-up",
    )


def make_bench(d, threads, runs, skip_write=False):
    if not skip_write:
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        torch.manual_seed(7)
        model = transformers.Gemma4ForCausalLM(cfg_bench()).eval()
        # Small weights (std 0.02) keep the activations ordinary; scales around 1 as in the fixtures.
        kinds = randomize(model, 7, weight_std=0.02, scale_std=0.2)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(d)
        tok = build_tokenizer(BENCH_VOCAB_SIZE)
        write_tokenizer_files(d, tok, model_max_length=4096)
        print(f"wrote {d}: {n} parameters ({n * 4 / 1e9:.3f} GB f32), {len(kinds['weight'])} tensors")
        del model
    timing = time_transformers(d, threads, runs)
    n = sum(
        v.numel()
        for f in os.listdir(d)
        if f.endswith(".safetensors")
        for v in safetensors.torch.load_file(os.path.join(d, f)).values()
    )
    timing["parameters"] = n
    timing["transformers_version"] = transformers.__version__
    timing["torch_version"] = torch.__version__.split("+")[0]
    compact_json.dump(timing, os.path.join(d, "bench_transformers.json"))
    print(json.dumps(timing, indent=1))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def check_versions():
    have = {
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }
    wrong = {k: (v, PINNED[k]) for k, v in have.items() if v != PINNED[k]}
    if wrong:
        raise SystemExit(f"version mismatch (have, pinned): {wrong}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="subset of variant names")
    ap.add_argument("--bench", metavar="DIR", help="write the ~0.2 B bench checkpoint to DIR and time transformers")
    ap.add_argument("--bench-threads", type=int, default=2)
    ap.add_argument("--bench-runs", type=int, default=3, help="timed runs (median reported), after one warm-up")
    ap.add_argument("--bench-time-only", action="store_true", help="re-time an existing --bench DIR")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    check_versions()

    if args.bench:
        make_bench(args.bench, args.bench_threads, args.bench_runs, skip_write=args.bench_time_only)
        return 0

    norm = check_norm_formula()
    tok = build_tokenizer()
    check_tokenizer(tok)
    os.makedirs(OUT_ROOT, exist_ok=True)
    names = args.only or list(VARIANTS)
    for name in names:
        make_variant(name, VARIANTS[name], tok, quiet=args.quiet)
    check_tokenizer_folder(os.path.join(OUT_ROOT, names[0]), tok)
    if not args.quiet:
        print(f"Gemma4RMSNorm: {norm}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
