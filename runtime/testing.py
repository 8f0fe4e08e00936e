"""Tiny real artifacts for tests and the offline quickstart: a tokenizer trained here, small datasets in
every format and file type, and tiny models saved with that tokenizer. Nothing is downloaded.

    tok = build_tokenizer("out/tok")                        # byte-level BPE, ChatML chat template
    write_dataset("out/train.jsonl", "chat", 32)            # also "sharegpt", "instruction", "completion", "text"
    write_dataset("out/notes.txt", "text", 8, "txt")        # plain text: documents separated by blank lines
    build_tiny_model("out/model", family="llama")           # AutoModelForCausalLM / AutoTokenizer load it
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"  # in the vocabulary so that Qwen2Tokenizer (forced for qwen2 dirs) adds no token
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END, ENDOFTEXT]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ChatML that also renders tools, assistant tool calls and tool turns (the way Qwen2.5's template does), for
# tests of tool-calling data; build_tokenizer(path, chat_template=TOOL_CHAT_TEMPLATE).
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' + tools | tojson + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "book", "car", "apple", "ball", "cup",
          "garden", "city", "child", "teacher", "farmer", "song", "boat", "door", "window", "road", "star", "cake",
          "mountain", "forest", "letter", "picture", "kitchen", "library", "market", "island", "bridge", "train",
          "flower", "basket", "pencil", "doctor", "student", "village", "morning", "evening", "question", "answer",
          "computer", "language", "summer", "winter", "friend", "family", "number", "story", "water", "bread"]
_ADJS = ["red", "blue", "green", "small", "big", "happy", "quiet", "old", "new", "warm", "cold", "bright",
         "yellow", "purple", "gentle", "clever", "famous", "strange", "simple", "beautiful", "careful", "heavy"]
_VERBS = ["sees", "likes", "finds", "helps", "paints", "reads", "follows", "carries", "opens", "visits",
          "remembers", "watches", "cleans", "builds", "explains", "answers", "counts", "writes", "draws", "teaches"]
_PLACES = ["in the park", "near the lake", "at home", "on the hill", "by the sea", "in the town", "at school",
           "under the bridge", "behind the library", "inside the kitchen", "across the river", "next to the market"]
_TEMPLATES = [
    "The {a} {n} {v} the {n2} {p}.",
    "A {a} {n} is {p}.",
    "What does the {n} do? It {v} the {a} {n2}.",
    "Where is the {n}? The {n} is {p}.",
    "Every day the {n} {v} a {a} {n2}.",
    "Please tell me about the {a} {n}.",
    "The answer is that the {n2} is {a}.",
    "Write a short story about a {n} and a {n2}.",
]


def corpus(n: int = 800, seed: int = 0) -> list[str]:
    """n simple English sentences, the same every time for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(rng.choice(_TEMPLATES).format(a=rng.choice(_ADJS), n=rng.choice(_NOUNS), n2=rng.choice(_NOUNS),
                                                 v=rng.choice(_VERBS), p=rng.choice(_PLACES)))
    return out


def build_tokenizer(path: str | Path, *, vocab_size: int = 768, add_bos: bool = False,
                    chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """Train a byte-level BPE tokenizer on `corpus()`, save it to `path` and return it loaded with AutoTokenizer.

    Special tokens <|pad|> <|bos|> <|eos|> <|im_start|> <|im_end|> <|endoftext|>; a ChatML chat template
    (None: no template); add_bos=True makes the tokenizer put <|bos|> before every text, like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 extra_special_tokens=[IM_START, IM_END, ENDOFTEXT])
    if chat_template:
        hf.chat_template = chat_template
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------- datasets


def _qa(i: int) -> tuple[str, str]:
    n, n2 = _NOUNS[i % len(_NOUNS)], _NOUNS[(i * 7 + 3) % len(_NOUNS)]
    a, p = _ADJS[i % len(_ADJS)], _PLACES[i % len(_PLACES)]
    return f"Where is the {a} {n}?", f"The {a} {n} is {p}, next to the {n2}."


def example_records(format: str, n: int) -> list[dict]:
    """n deterministic records of `format` (chat | sharegpt | instruction | completion | text); a sharegpt record
    is the chat record of the same index written as ShareGPT (`conversations`, from human/gpt/system, value)."""
    out: list[dict] = []
    for i in range(n):
        q, a = _qa(i)
        if format == "chat":
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 == 0 else []
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                q2, a2 = _qa(i + 11)
                messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
            out.append({"messages": messages})
        elif format == "sharegpt":
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            chat = example_records("chat", i + 1)[i]["messages"]
            out.append({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in chat]})
        elif format == "instruction":
            rec = {"instruction": "Answer the question in one sentence." if i % 2 else q,
                   "input": q if i % 2 else "", "output": a}
            out.append(rec)
        elif format == "completion":
            out.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"})
        elif format == "text":
            out.append({"text": f"{q} {a}"})
        else:
            raise ValueError(f"unknown format {format!r}; expected chat, sharegpt, instruction, completion or text")
    return out


def write_records(path: str | Path, records: list[dict], fmt: str | None = None) -> Path:
    """Write records as jsonl | json | csv | parquet | txt (default: from the file extension). In CSV, non-string
    values (chat messages) are JSON-encoded cells. Parquet needs pyarrow. txt takes text records only and writes
    their texts separated by a blank line (a text that holds a blank line itself is refused)."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "jsonl").lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif fmt == "csv":
        keys = list(dict.fromkeys(k for r in records for k in r))
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in records:
                w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "txt":
        texts = [r.get("text") for r in records]
        if any(set(r) != {"text"} or not isinstance(t, str) or not t.strip()
               or any(not line.strip() for line in t.split("\n")) for r, t in zip(records, texts, strict=True)):
            raise ValueError("a .txt file holds text records only, each non-empty and without blank lines")
        path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    else:
        raise ValueError(f"unknown file type {fmt!r}; expected jsonl, json, csv, parquet or txt")
    return path


def write_dataset(path: str | Path, format: str, n: int, fmt: str = "jsonl") -> Path:
    """Write `n` deterministic records of `format` to `path` as `fmt` (jsonl | json | csv | parquet | txt)."""
    return write_records(path, example_records(format, n), fmt)


# ---------------------------------------------------------------------------------------------------- models

_FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=1024),
}


def build_tiny_model(path: str | Path, family: str = "llama", vocab_size: int | None = None,
                     seed: int = 0, **overrides) -> Path:
    """Save a tiny randomly initialised `family` (llama | qwen2 | gpt2) causal LM and the build_tokenizer()
    tokenizer to `path` (safetensors); returns `path`. vocab_size defaults to the tokenizer's length;
    `overrides` are config fields."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(_FAMILIES)}")
    path = Path(path)
    tok = build_tokenizer(path)
    cfg = {**_FAMILIES[family], "vocab_size": vocab_size or len(tok), "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **overrides}
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path
