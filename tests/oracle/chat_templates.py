"""Reference renderings of the chat templates, for tests/chat.rs.

For every template in ../shared/templates (history/ included) this renders a set of
conversations with transformers' own `apply_chat_template(tokenize=False)` (transformers
5.23.0, jinja2 3.1.6) and writes tests/fixtures/chat/<template>.json:

    {"template": "history/gemma-4-E2B-it.pre-2026-07.jinja", "sha256": ..., "generator": ...,
     "context": {special tokens passed to the template},
     "cases": [{"name", "messages", "tools"?, "add_generation_prompt", "kwargs",
                "rendered" | "error"}]}

The special tokens of the target model are passed explicitly (they override the tokenizer's),
so the Rust side renders with exactly the same context. Cases that make the template call
`raise_exception` record the message instead of a rendering.

Run from the repository root (about 2 s, no network):

    /work/oracle-env/venv/bin/python tests/oracle/chat_templates.py [--templates DIR]
"""

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/chat"
# Any tokenizer will do: its special tokens are overridden per template below.
TOKENIZER = ROOT / "tests/fixtures/gemma4/e2b-like"

# The special tokens each model's tokenizer_config.json names (see ../shared/templates/README.md).
CONTEXT = {
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "qwen": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "laguna": {"bos_token": "〈|EOS|〉", "eos_token": "〈|EOS|〉", "pad_token": "<pad>"},
}

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
U1 = {"role": "user", "content": "Hello! Who are you?"}
A1 = {"role": "assistant", "content": "I am a language model."}
U2 = {"role": "user", "content": "What is 2 + 2?\nShow the sum."}
A2 = {"role": "assistant", "content": "  2 + 2 = 4  "}
U3 = {"role": "user", "content": "Thanks — and in French? «quatre» ☕ {{ not_a_variable }} {% raw %}"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city, «quoted» & <escaped>?",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "description": "How many days"},
                },
                "required": ["city"],
            },
        },
    }
]
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
          "content": '{"temp_c": 21, "sky": "clear"}'}


def cases(family):
    """(name, messages, tools, kwargs) for one template family."""
    think_raw = {
        "gemma": "<|channel>thought\nThe user greets me.<channel|>Hi there.",
        "qwen": "<think>\nThe user greets me.\n</think>\n\nHi there.",
        "laguna": "<think>\nThe user greets me.\n</think>\nHi there.",
    }[family]
    out = [
        ("single_user", [U1], None, {}),
        ("system_three_turns", [SYSTEM, U1, A1, U2, A2, U3], None, {}),
        ("no_system_two_turns", [U1, A1, U2], None, {}),
        ("ends_with_assistant", [SYSTEM, U1, A1], None, {}),
        ("reasoning_field", [SYSTEM, U1, dict(A1, reasoning_content="Greeting; reply briefly."), U2], None, {}),
        ("reasoning_last", [U1, dict(A1, reasoning_content="Greeting; reply briefly.")], None, {}),
        ("thinking_in_content", [U1, {"role": "assistant", "content": think_raw}, U2], None, {}),
        ("tools", [SYSTEM, U1, CALL, RESULT], TOOLS, {}),
        ("system_in_middle", [U1, A1, SYSTEM, U2], None, {}),
        ("empty_system", [{"role": "system", "content": ""}, U1], None, {}),
    ]
    more = []
    for name, msgs, tools, kw in out:
        if name in ("system_three_turns", "single_user", "reasoning_field", "tools"):
            for flag in (True, False):
                more.append((f"{name}+thinking_{'on' if flag else 'off'}", msgs, tools, {"enable_thinking": flag}))
    return out + more


def family_of(name):
    if name.startswith("gemma"):
        return "gemma"
    if name.startswith("Qwen"):
        return "qwen"
    if name.startswith("Laguna"):
        return "laguna"
    raise SystemExit(f"no context known for template {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", default=os.environ.get("LLMARCH_TEMPLATES", ROOT.parent / "shared/templates"))
    args = ap.parse_args()
    src = Path(args.templates)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    OUT.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*.jinja"))
    if not files:
        raise SystemExit(f"no *.jinja under {src}")
    for path in files:
        rel = path.relative_to(src).as_posix()
        text = path.read_text(encoding="utf-8")
        fam = family_of(path.name)
        ctx = CONTEXT[fam]
        takes_thinking = "enable_thinking" in text
        recorded = []
        for name, msgs, tools, kw in cases(fam):
            if kw.get("enable_thinking") is not None and not takes_thinking:
                continue
            for gen in (True, False):
                case = {"name": name, "messages": msgs, "add_generation_prompt": gen, "kwargs": kw}
                if tools is not None:
                    case["tools"] = tools
                try:
                    rendered = tok.apply_chat_template(
                        copy.deepcopy(msgs), tools=copy.deepcopy(tools), chat_template=text, tokenize=False,
                        add_generation_prompt=gen, **ctx, **kw,
                    )
                    case["rendered"] = rendered
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                recorded.append(case)
        doc = {
            "template": rel,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "generator": f"tests/oracle/chat_templates.py, transformers {transformers.__version__}, "
                         f"jinja2 {jinja2.__version__}, apply_chat_template(tokenize=False)",
            "context": ctx,
            "cases": recorded,
        }
        out = OUT / (rel.replace("/", "__").removesuffix(".jinja") + ".json")
        out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        errors = sum("error" in c for c in recorded)
        print(f"{out.relative_to(ROOT)}: {len(recorded)} cases ({errors} raise)", file=sys.stderr)


if __name__ == "__main__":
    main()
