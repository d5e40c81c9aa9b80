"""`llmcycle generate`: complete one prompt, streamed to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from lifecycle_cli.generate.options import from_flags, sampling_flags


@sampling_flags
def generate(
    checkpoint_dir: Path,
    prompt: str,
    prompt_style: str = "auto",
    system: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
    quantize: Optional[str] = None,
    draft_checkpoint: Optional[Path] = None,
    draft_tokens: int = 4,
    draft_quantize: Optional[str] = None,
    adapter: Optional[Path] = None,
    **sampling: Any,
) -> None:
    """Generate a completion of a prompt and print it as it is generated.

    Timing goes to stderr: `Time for inference: X sec total, Y tokens/sec, Z tokens`.

    Args:
        checkpoint_dir: The checkpoint folder (with its tokenizer).
        prompt: The text to continue.
        {sampling}
        prompt_style: How the prompt is formatted. `auto`: as one user message in the style
            saved with a finetuned checkpoint (prompt_style.yaml), else in the tokenizer's chat
            template (an instruct model), else exactly as given (a base model). `plain`: exactly
            as given (a completion), whatever the checkpoint. Or one of: chat_template, alpaca,
            chatml, llama3, llama2, mistral, phi3, gemma, qwen.
        system: A system prompt (with `plain`: a line before the prompt).
        precision: 32-true, bf16-true or 16-true (default: bf16-true on a GPU that supports
            it, else 32-true).
        device: auto (a GPU if there is one, else CPU), cpu, cuda, cuda:N or mps.
        compile: Compile the decoding step with torch.compile: faster per token, after some
            seconds of compiling. Pays off for long outputs.
        quantize: int8 or int4: weight-only quantized linear layers and output head (int8
            per output channel, int4 per group of 32 inputs), for less memory and faster
            decoding; the checkpoint is unchanged. Default: the weights as stored.
        draft_checkpoint: Speculative decoding: a model with the same tokenizer (smaller, or
            this one with --draft_quantize) proposes --draft_tokens tokens that this model
            checks in one pass; greedy output is unchanged, samples keep this model's
            distribution. The acceptance rate goes to stderr with the timing.
        draft_tokens: Tokens the draft proposes per step.
        draft_quantize: int8 or int4: quantize the draft model's weights (as --quantize).
        adapter: A LoRA run (`finetune`/`align --method lora` out_dir, its final/ or its
            lora.safetensors) to put on top of checkpoint_dir, its base, without merging; its
            recorded prompt style becomes the default.
    """
    from lifecycle_cli.api import load_for_inference
    from lifecycle_cli.generate import format_stats

    params = from_flags(sampling)  # bad values fail here, before the model loads
    llm = load_for_inference(
        checkpoint_dir,
        device,
        precision,
        quantize,
        draft_checkpoint,
        draft_tokens,
        draft_quantize,
        adapter,
    )
    ids, style_stops = llm.prepare_prompt(prompt, prompt_style, system)
    params = params.replace(stop=params.stop + style_stops)
    stream = llm.generator(compile=compile).stream(ids, params)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(stream.completion), file=sys.stderr)
