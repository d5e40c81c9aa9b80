"""`make check-gguf`: every family `convert to_gguf` writes, run by llama.cpp itself.

For each tiny random model (TINY_FAMILIES, with a byte-level BPE and a chat template) this
exports f32, f16 and q8_0 GGUF files and, through llama-cpp-python (its own virtual environment,
built from source: `LLAMA_PYTHON`), checks:

- f32 logits within 1e-3 of llmcycle's, at every position of a 64-token sequence (llmcycle's
  computed with llama.cpp's fp16 GELU table, whose rounding alone moves a GEGLU model's logits
  by ~1e-3; the difference from the exact GELU is printed beside);
- the same greedy continuation (24 tokens) from f32 and from f16 as `llmcycle generate`;
- q8_0: >= 95% top-1 agreement with llmcycle's f32 logits over 100 positions of held-out text;
- the chat template llama.cpp reads formats a conversation exactly as `llmcycle chat` does;
- llama.cpp decode tokens/s on q8_0 next to llmcycle's generate on the same checkpoint.

Run: python -m benchmarks.gguf_check [--llama_python PATH] [--families llama,qwen2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_COMMON = dict(
    vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128,
    block_size=256, norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5,
)  # fmt: skip
_GEMMA = dict(
    _COMMON, mlp="geglu", gelu_approximate="tanh", norm_unit_offset=True, scale_embeddings=True,
    tie_embeddings=True, head_size=16, norm_eps=1e-6,
)  # fmt: skip
# One tiny model per exported family, each with the features llama.cpp must get right.
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        _COMMON, hf_model_type="llama", rope_base=500000.0,
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_seq_len=8192),
    ),
    "mistral": dict(_COMMON, hf_model_type="mistral", rope_base=1e6, n_query_groups=1),
    "qwen2": dict(_COMMON, hf_model_type="qwen2", attn_bias=True, tie_embeddings=True,
                  rope_base=1e6, norm_eps=1e-6),
    "qwen3": dict(_COMMON, hf_model_type="qwen3", qk_norm=True, head_size=32, rope_base=1e6,
                  norm_eps=1e-6),
    "gemma": dict(_GEMMA, hf_model_type="gemma", n_query_groups=1),
    "gemma2": dict(
        _GEMMA, hf_model_type="gemma2", attention_scale=16**-0.5, post_attention_norm=True,
        post_mlp_norm=True, attention_logit_softcapping=20.0, final_logit_softcapping=10.0,
        sliding_window=16, sliding_window_pattern=2,
    ),
    "gemma3": dict(
        _GEMMA, hf_model_type="gemma3_text", attention_scale=16**-0.5, n_layer=3,
        post_attention_norm=True, post_mlp_norm=True, qk_norm=True, sliding_window=16,
        sliding_window_pattern=3, rope_base=1e6, rope_local_base=10000.0,
    ),
    "mixtral": dict(
        _COMMON, hf_model_type="mixtral", mlp="moe", n_expert=4, n_expert_per_token=2,
        rope_base=1e6,
    ),
    "qwen3_moe": dict(
        _COMMON, hf_model_type="qwen3_moe", mlp="moe", n_expert=4, n_expert_per_token=2,
        expert_intermediate_size=32, qk_norm=True, head_size=32, rope_base=1e6, norm_eps=1e-6,
    ),
    "gpt2": dict(
        _COMMON, hf_model_type="gpt2", norm="layernorm", mlp="gelu", gelu_approximate="tanh",
        bias=True, position_embedding="learned", n_query_groups=4, tie_embeddings=True,
    ),
    "gpt_neox": dict(
        _COMMON, hf_model_type="gpt_neox", norm="layernorm", mlp="gelu", bias=True,
        rotary_percentage=0.25, parallel_residual=True, n_query_groups=4,
    ),
    "phi3": dict(_COMMON, hf_model_type="phi3", rope_base=10000.0),
    "olmo2": dict(
        _COMMON, hf_model_type="olmo2", pre_norm=False, post_attention_norm=True,
        post_mlp_norm=True, qk_norm=True, qk_norm_scope="all", norm_eps=1e-6, rope_base=5e5,
    ),
    "smollm3": dict(
        _COMMON, hf_model_type="smollm3", n_layer=4, nope_layers=[3], tie_embeddings=True,
        rope_base=5e6,
    ),
}  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on Python's own help text, eos <|im_end|>, a ChatML template."""
    from pydoc_data.topics import topics

    from lifecycle_cli.tokenizer import train_bpe

    train_bpe(None, vocab_size, out, texts=list(topics.values())[:50], special_tokens=SPECIAL)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def tiny_checkpoint(
    family: str, out: Path, tokenizer_dir: Path, seed: int = 0, train_steps: int = 0
) -> Path:
    """A random-init checkpoint folder of `family` (weights perturbed so every norm and bias
    matters), with the tokenizer of `tokenizer_dir`; `train_steps` of Adam on Python's help
    text give it the peaked predictions of a trained model (a random one's are near-ties)."""
    import torch

    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.config import Config
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import Tokenizer

    torch.manual_seed(seed)
    model = GPT(Config.from_dict({**TINY_FAMILIES[family], "name": f"tiny-{family}"}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if train_steps:
        from pydoc_data.topics import topics

        ids = torch.tensor(Tokenizer(tokenizer_dir).encode(" ".join(list(topics.values())[:40])))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(train_steps):
            starts = torch.randint(0, len(ids) - 65, (8,))
            batch = torch.stack([ids[s : s + 65] for s in starts])
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    return save_checkpoint(out, model, tokenizer_dir)


TEXTS = ["Hello, world!", "def f(x):\n    return x * 2  # 1234", "  naïve café — 🙂",
         "<|im_start|>user\nHi<|im_end|>"]  # fmt: skip
MESSAGES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]  # fmt: skip
SEQ, NEW, Q8_POSITIONS, DECODE, TRAIN_STEPS = 64, 24, 100, 128, 60


@contextmanager
def llama_cpp_gelu():
    """GELU as llama.cpp's CPU backend computes it (GGML_GELU_FP16: the input rounded to fp16,
    looked up in a table of fp16 values of the tanh approximation, whatever GELU the model was
    trained with; x beyond +-10), to tell its rounding from ours."""
    import torch
    import torch.nn.functional as F

    exact = F.gelu

    def table(x, approximate="none"):  # ggml's table holds the tanh approximation, always
        y = exact(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    F.gelu = table
    try:
        yield
    finally:
        F.gelu = exact


def llmcycle_side(ckpt: Path) -> dict[str, Any]:
    """What llmcycle computes for the checks: logits, greedy continuation, chat prompts, and
    decode tokens/s of `generate`'s engine (greedy, batch 1, eos ignored)."""
    import torch

    from lifecycle_cli.api import LLM
    from lifecycle_cli.generate.options import SamplingParams
    from lifecycle_cli.prompts import resolve_style

    llm = LLM.load(ckpt)
    from pydoc_data.topics import topics

    # Held-out text (the tiny models train on the first 40 topics): real predictions, not the
    # near-ties of random tokens.
    held_out = " ".join(list(topics.values())[60:80])
    tokens = llm.tokenizer.encode(held_out, bos=False)[:Q8_POSITIONS]
    with torch.no_grad():
        logits = llm.model(torch.tensor([tokens]))[0]
        with llama_cpp_gelu():
            table_logits = llm.model(torch.tensor([tokens]))[0]
    prompt = llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW, ignore_eos=True)
    greedy = llm.generator().generate_batch([prompt], params)[0].token_ids
    style = resolve_style(ckpt, llm.tokenizer)  # what `llmcycle chat` uses
    speed = []
    for _ in range(3):
        params = SamplingParams(temperature=0.0, max_new_tokens=DECODE, ignore_eos=True)
        start = time.perf_counter()
        done = llm.generator().generate_batch([prompt], params)[0]
        first = done.time_to_first_token or 0.0
        speed.append((len(done.token_ids) - 1) / (time.perf_counter() - start - first))
    # the best of 3 (as on the llama.cpp side): the machine may be shared
    return dict(
        tokens=tokens, logits=logits, table_logits=table_logits, prompt=prompt, greedy=greedy,
        ids=[llm.tokenizer.encode(t, bos=False) for t in TEXTS],
        chat=[style.render(m) for m in MESSAGES], decode_tokens_per_s=max(speed),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama_python", default=os.environ.get("LLAMA_PYTHON", ""))
    parser.add_argument("--families", default=",".join(TINY_FAMILIES))
    parser.add_argument(
        "--checkpoint", default=None, help="also check this checkpoint folder (a real model)"
    )
    args = parser.parse_args(argv)
    if not args.llama_python:
        print("name the llama-cpp-python environment's python: --llama_python or $LLAMA_PYTHON")
        return 2
    import numpy as np
    import torch

    from lifecycle_cli.zoo.gguf import export_gguf

    families = [f for f in args.families.split(",") if f]
    failures: list[str] = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = tiny_tokenizer(root / "tokenizer")
        ours, job = {}, []
        if args.checkpoint:
            families.append("checkpoint")
        for family in families:
            if family == "checkpoint":
                ckpt = Path(args.checkpoint)
            else:
                ckpt = tiny_checkpoint(family, root / family, tokenizer, train_steps=TRAIN_STEPS)
            ours[family] = llmcycle_side(ckpt)
            for dtype in ("f32", "f16", "q8_0"):
                path, _ = export_gguf(ckpt, root / f"{family}-{dtype}.gguf", dtype=dtype)
                job.append(dict(
                    key=f"{family}-{dtype}", path=str(path), tokens=ours[family]["tokens"],
                    logits_file=str(root / f"{family}-{dtype}.npy"),
                    prompt=ours[family]["prompt"], new_tokens=NEW, texts=TEXTS,
                    messages=MESSAGES, decode_tokens=DECODE if dtype == "q8_0" else 0,
                ))  # fmt: skip
        (root / "job.json").write_text(json.dumps({"models": job}))
        worker = Path(__file__).with_name("gguf_llamacpp.py")
        done = subprocess.run(
            [args.llama_python, str(worker), str(root / "job.json"), str(root / "out.json")],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            print(done.stdout + done.stderr)
            return 1
        theirs = json.loads((root / "out.json").read_text())
        for key, value in theirs.items():
            value["logits"] = torch.from_numpy(np.load(root / f"{key}.npy"))

    for family in families:
        mine = ours[family]

        def check(ok: bool, what: str, family: str = family) -> str:
            if not ok:
                failures.append(f"{family}: {what}")
            return "ok" if ok else "FAIL"

        f32, f16, q8 = (theirs[f"{family}-{d}"] for d in ("f32", "f16", "q8_0"))
        theirs_f32 = f32["logits"][:SEQ]
        exact = float((theirs_f32 - mine["logits"][:SEQ]).abs().max())
        diff = float((theirs_f32 - mine["table_logits"][:SEQ]).abs().max())
        same = int((q8["logits"].argmax(-1) == mine["logits"].argmax(-1)).sum())
        agree = same / len(mine["tokens"])  # counted, not a float32 mean (95/100 < 0.95 there)
        row = dict(
            family=family,
            f32_logits_max_diff=f"{diff:.1e} {check(diff <= 1e-3, f'f32 logits differ: {diff}')}",
            vs_exact_gelu=f"{exact:.1e}",
            greedy_f32=check(f32["greedy"] == mine["greedy"], "f32 greedy continuation differs"),
            greedy_f16=check(f16["greedy"] == mine["greedy"], "f16 greedy continuation differs"),
            q8_0_top1=f"{agree:.0%} {check(agree >= 0.95, f'q8_0 top-1 agreement {agree:.0%}')}",
            tokenization=check(f32["ids"] == mine["ids"], "tokenization differs"),
            chat_template=check(f32.get("chat") == mine["chat"], "chat template renders otherwise"),
            llamacpp_q8_0_tok_s=round(q8["decode_tokens_per_s"]),
            llmcycle_tok_s=round(mine["decode_tokens_per_s"]),
        )
        rows.append(row)
        print(json.dumps(row))
    print(f"{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
