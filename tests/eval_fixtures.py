"""What the evaluate tests share: a tiny exportable checkpoint and small task files."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import torch

from lifecycle_cli.checkpoint import save_checkpoint
from lifecycle_cli.config import Config
from lifecycle_cli.model import GPT
from lifecycle_cli.tokenizer import train_bpe

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_llama(folder: Path, context: int = 128, seed: int = 0) -> Path:
    """A random 2-layer Llama-shaped checkpoint (exportable with `convert to_hf`) with a
    400-token BPE; weights perturbed so that logits are far from flat."""
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    tok = train_bpe(None, 400, tok_dir, texts=["\n".join(topics.values())], special_tokens=SPECIALS)
    torch.manual_seed(seed)
    config = Config(
        name="tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
        block_size=context, intermediate_size=64, norm="rmsnorm", mlp="swiglu", bias=False,
        hf_model_type="llama",
    )  # fmt: skip
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return save_checkpoint(folder, model, tokenizer_dir=tok_dir)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MC = [
    {"question": "What is two plus two?", "choices": ["four", "five", "a cat"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["blue", "green"], "answer": 0},
    {"question": "Which is a number?", "choices": ["seven", "table", "run"], "answer": 0},
    {"question": "Python is a", "choices": ["language", "river"], "answer": 0},
    {"question": "Opposite of up", "choices": ["down", "left", "red"], "answer": 0},
    {"question": "Say it in full", "choices": ["no", "all of it, at length"], "answer": 1},
]

GEN = [
    {"prompt": "The return statement", "answer": " is"},
    {"prompt": "A class definition", "answer": " x"},
    {"prompt": "Exceptions are", "answer": " raised"},
]


def lm_eval_tasks(folder: Path) -> Path:
    """A folder of two lm-eval tasks over local JSON files (no download): tiny_mc
    (multiple_choice: acc, acc_norm) and tiny_gen (generate_until: exact_match)."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = write_jsonl(folder / "mc.jsonl", MC)
    gen = write_jsonl(folder / "gen.jsonl", GEN)
    (folder / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    (folder / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return folder
