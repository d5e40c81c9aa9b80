"""The Python API: `LLM.load(folder)` gives the model and its tokenizer; `generate` and
`stream` talk to it."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lifecycle_cli.checkpoint import load_model
from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.generate import Generator, SamplingParams, fast_decode_layout
from lifecycle_cli.generate.options import sampling_flags
from lifecycle_cli.model import GPT
from lifecycle_cli.prompts import PromptStyle, resolve_style, style_folder
from lifecycle_cli.tokenizer import Tokenizer


def load_for_inference(
    checkpoint_dir: Path | str,
    device: str = "auto",
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    draft_checkpoint: Optional[Path | str] = None,
    draft_tokens: int = 4,
    draft_quantize: Optional[str] = None,
    adapter: Optional[Path | str] = None,
) -> LLM:
    """What `generate`, `chat`, `serve` and `evaluate` load: an `LLM` with a tokenizer, on
    `device` ('auto': CUDA if there is one) in `precision` (None: bf16 on a GPU that has it, else
    32-true), its linear layers `quantize`d (int8, int4) if asked, which is reported on stderr;
    with `draft_checkpoint`, a draft model for speculative decoding (see `LLM.load`); with a LoRA
    run's `adapter` on top if given."""
    from lifecycle_cli.checkpoint import check_checkpoint_dir
    from lifecycle_cli.generate import resolve_device, resolve_precision
    from lifecycle_cli.generate.options import check_quantize

    folder = check_checkpoint_dir(checkpoint_dir)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json: generating text needs a tokenizer")
    check_quantize(quantize)
    check_quantize(draft_quantize, "--draft_quantize")
    if quantize is not None and adapter is not None:
        raise UserError(
            "--quantize applies to plain weights, not to unmerged --adapter layers: quantize the "
            "run's final/ (its adapters merged) instead"
        )
    if draft_tokens < 1:
        raise UserError(f"--draft_tokens must be at least 1, got {draft_tokens}")
    if draft_checkpoint is not None:
        draft_checkpoint = check_checkpoint_dir(draft_checkpoint)
    elif draft_quantize is not None:
        raise UserError("--draft_quantize needs --draft_checkpoint (the draft model to quantize)")
    dev = resolve_device(device)
    llm = LLM.load(
        folder, device=dev, dtype=resolve_precision(precision, dev), quantize=quantize,
        draft_checkpoint=draft_checkpoint, draft_tokens=draft_tokens,
        draft_quantize=draft_quantize, adapter=adapter,
    )  # fmt: skip
    if llm.weight_bytes is not None:
        before, after = llm.weight_bytes
        print(
            f"--quantize {quantize}: weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
            "(the blocks' linear layers; the output head int8; embeddings and norms in full "
            "precision)",
            file=sys.stderr,
        )
    return llm


class LLM:
    """A loaded checkpoint: `llm.model` (the GPT module) and `llm.tokenizer`."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Optional[Tokenizer],
        checkpoint_dir: Path,
        style_dir: Optional[Path] = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint_dir = checkpoint_dir
        self.style_dir = style_dir or checkpoint_dir  # where its prompt style is read
        self._generator: Optional[Generator] = None
        self._compiled = False
        # (bytes before, after) when loaded with `quantize`
        self.weight_bytes: Optional[tuple[int, int]] = None
        self.draft: Optional[GPT] = None  # speculative decoding's draft model
        self.draft_tokens = 4

    @property
    def config(self) -> Config:
        return self.model.config

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path | str,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        quantize: Optional[str] = None,
        draft_checkpoint: Optional[Path | str] = None,
        draft_tokens: int = 4,
        draft_quantize: Optional[str] = None,
        adapter: Optional[Path | str] = None,
    ) -> LLM:
        """Load any checkpoint folder the tool wrote (float32 on CPU unless `dtype` says).

        quantize: int8 (per output channel) or int4 (per group of 32 inputs) weight-only
        quantized linear layers (the output head int8 in both), for inference
        (`generate.quantized`); the checkpoint on disk is unchanged. `weight_bytes` then holds
        the bytes before and after.
        draft_checkpoint: a model with the same tokenizer (smaller, or this one quantized with
        `draft_quantize`) that proposes `draft_tokens` tokens per step for this one to verify
        in one pass (speculative decoding, one prompt at a time; greedy output unchanged).
        adapter: a LoRA run (its folder, final/ or lora.safetensors) whose adapters go on top
        of this base, unmerged; its recorded prompt style is then the default."""
        from lifecycle_cli.generate.quantized import quantize_for_inference
        from lifecycle_cli.lora import find_adapter, load_lora

        checkpoint_dir = Path(checkpoint_dir)
        model = load_model(checkpoint_dir, device=device, dtype=dtype)
        if adapter is not None:
            load_lora(model, find_adapter(adapter)[0])
            model.eval()
        has_tokenizer = (checkpoint_dir / "tokenizer.json").is_file()
        tokenizer = Tokenizer(checkpoint_dir) if has_tokenizer else None
        llm = cls(model, tokenizer, checkpoint_dir, style_folder(checkpoint_dir, adapter))
        if quantize is not None:
            llm.weight_bytes = quantize_for_inference(model, quantize)
        if draft_checkpoint is not None:
            llm.draft = cls.load(draft_checkpoint, device, dtype, quantize=draft_quantize).model
            llm.draft_tokens = draft_tokens
        return llm

    def generator(self, compile: bool = False) -> Generator:
        """The `Generator` behind `generate`/`stream` (kept, with its KV cache, between calls).

        compile: compile the decoding step (the weights must not change afterwards)."""
        if self._generator is None or (compile and not self._compiled):
            fast_decode_layout(self.model)
            if self.draft is not None:
                fast_decode_layout(self.draft)
            self._generator = Generator(
                self.model, self.tokenizer, compile=compile, draft=self.draft,
                draft_tokens=self.draft_tokens,
            )  # fmt: skip
            self._compiled = compile
        return self._generator

    def prompt_style(self, name: Optional[str] = "auto") -> PromptStyle:
        """The prompt style `name`; 'auto': the one saved with the checkpoint, else the
        tokenizer's chat template, else plain (see `lifecycle_cli.prompts.resolve_style`)."""
        return resolve_style(self.style_dir, self.tokenizer, name)

    def prepare_prompt(
        self, prompt: str, prompt_style: Optional[str], system: Optional[str]
    ) -> tuple[list[int], tuple[str, ...]]:
        """A user prompt as token ids, formatted by `prompt_style` (see `generate`), and the
        style's stop strings."""
        if self.tokenizer is None:
            raise UserError(f"{self.checkpoint_dir} has no tokenizer.json: cannot encode text")
        style = self.prompt_style(prompt_style)
        return style.encode(self.tokenizer, style.apply(prompt, system)), style.stop

    @staticmethod
    def _params(sampling: dict[str, Any], style_stop: Sequence[str]) -> SamplingParams:
        """Sampling keyword arguments as settings, the prompt style's stops added."""
        stop = sampling.get("stop")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return SamplingParams(**{**sampling, "stop": stop + tuple(style_stop)})

    @sampling_flags
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        prompt_style: Optional[str] = "auto",
        system: Optional[str] = None,
        **sampling: Any,
    ) -> Union[str, list[str]]:
        """The completion of `prompt` (a list of prompts: their completions, generated together
        as one batch).

        temperature 0 is greedy. The output ends at the end-of-sequence token, a `stop` string
        (not included) or `max_new_tokens`. prompt_style 'auto' formats the prompt as a user
        message the way the checkpoint expects: the style saved with a finetuned checkpoint
        (prompt_style.yaml), else its tokenizer's chat template, else the prompt as given (a
        base model). 'plain' always uses the prompt as given; any other name (e.g.
        'chat_template', 'alpaca') formats it in that style.

        Sampling (keyword arguments, any `SamplingParams` field):
            {sampling}
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prepared = [self.prepare_prompt(p, prompt_style, system) for p in prompts]
        params = [self._params(sampling, style_stop) for _, style_stop in prepared]
        done = self.generator().generate_batch([ids for ids, _ in prepared], params)
        texts = [c.text for c in done]
        return texts[0] if isinstance(prompt, str) else texts

    @sampling_flags
    def stream(
        self,
        prompt: str,
        prompt_style: Optional[str] = "auto",
        system: Optional[str] = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """`generate`, as text pieces while they are generated (never half a character).

        Sampling (keyword arguments, any `SamplingParams` field):
            {sampling}
        """
        ids, style_stop = self.prepare_prompt(prompt, prompt_style, system)
        yield from self.generator().stream(ids, self._params(sampling, style_stop))
