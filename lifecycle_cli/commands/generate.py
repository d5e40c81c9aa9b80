"""`llmcycle generate`: complete one prompt, streamed to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union


def generate(
    checkpoint_dir: Path,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    stop: Union[list[str], str] = (),
    prompt_style: str = "auto",
    system: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
) -> None:
    """Generate a completion of a prompt and print it as it is generated.

    Timing goes to stderr: `Time for inference: X sec total, Y tokens/sec, Z tokens`.

    Args:
        checkpoint_dir: The checkpoint folder (with its tokenizer).
        prompt: The text to continue.
        max_new_tokens: At most this many new tokens (fewer if the context runs out).
        temperature: Sampling temperature; 0 picks the most likely token every time (greedy).
        top_k: Sample only among the k most likely tokens (null: all).
        top_p: Sample only among the most likely tokens that together hold this probability.
        min_p: Drop tokens less likely than min_p times the most likely one (0: off).
        repetition_penalty: Above 1, tokens already in the prompt or output become less likely.
        seed: Random seed, for output that repeats run after run (unset: different each run).
        stop: A string (or a list, `--stop '["a", "b"]'`) that ends the output; it is not
            printed. `\\n` and `\\t` stand for newline and tab.
        prompt_style: How the prompt is formatted. `auto`: the style saved with a finetuned
            checkpoint (prompt_style.yaml), else the prompt exactly as given (a completion).
            `chat_template` (the tokenizer's own template) or alpaca, chatml, llama3, llama2,
            mistral, phi3, gemma, qwen, plain: format it as one user message of that style.
        system: A system prompt (needs a prompt style other than the raw prompt).
        precision: 32-true, bf16-true or 16-true (default: bf16-true on a GPU that supports
            it, else 32-true).
        device: auto (a GPU if there is one, else CPU), cpu, cuda, cuda:N or mps.
        compile: Compile the decoding step with torch.compile: faster per token, after some
            seconds of compiling. Pays off for long outputs.
    """
    from lifecycle_cli.api import load_for_inference
    from lifecycle_cli.generate import SamplingParams, cli_stops, format_stats

    params = SamplingParams.pick(
        locals(), flags=True, stop=cli_stops(stop)
    )  # fails before the model loads
    llm = load_for_inference(checkpoint_dir, device, precision)
    ids, style_stops = llm.prepare_prompt(prompt, prompt_style, system)
    params = params.replace(stop=params.stop + style_stops)
    stream = llm.generator(compile=compile).stream(ids, params)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(stream.completion), file=sys.stderr)
