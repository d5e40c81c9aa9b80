"""`llmcycle chat`: talk to a model in the terminal, keeping the conversation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from lifecycle_cli.generate.options import from_flags, sampling_flags

FENCE = '"""'
HELP = (
    "Enter sends a message; an empty line or /exit quits (so does Ctrl-D); /reset forgets the "
    f"conversation; {FENCE} on its own line starts and ends a message of several lines; "
    "Ctrl-C stops a reply."
)


@sampling_flags
def chat(
    checkpoint_dir: Path,
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
    """Chat with a model in the terminal. The whole conversation is the prompt of each reply
    (the oldest exchanges are dropped when it would not fit the context).

    Enter sends a message; an empty line, /exit or Ctrl-D quits; /reset forgets the
    conversation; a line of three double quotes starts and ends a message of several lines;
    Ctrl-C stops a reply but not the chat. After each reply the time it took goes to stderr.

    Args:
        checkpoint_dir: The checkpoint folder (with its tokenizer).
        {sampling}
        prompt_style: How the conversation is formatted. `auto`: the style saved with a
            finetuned checkpoint (prompt_style.yaml), else the tokenizer's chat template, else
            plain. Or one of: chat_template, alpaca, chatml, llama3, llama2, mistral, phi3,
            gemma, qwen, plain.
        system: A system prompt that leads the conversation.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on a GPU that supports
            it, else 32-true).
        device: auto (a GPU if there is one, else CPU), cpu, cuda, cuda:N or mps.
        compile: Compile the decoding step with torch.compile (some seconds before the first
            reply, faster after).
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
    style = llm.prompt_style(prompt_style)
    params = params.replace(stop=params.stop + style.stop)
    session = ChatSession(llm.generator(compile=compile), llm.tokenizer, style, params, system)
    print(
        f"Now chatting with {Path(checkpoint_dir).name} ({style.name} prompt style).",
        file=sys.stderr,
    )
    print(HELP, file=sys.stderr)
    session.run()


class ChatSession:
    """The loop: read a message, fit the conversation into the context, stream the reply.

    Takes a `Generator`, its `Tokenizer`, a `PromptStyle` and `SamplingParams` (typed loosely
    here: jsonargparse resolves this module's type-checking imports, and `--help` must not
    import torch).
    """

    def __init__(
        self, generator: Any, tokenizer: Any, style: Any, params: Any, system: Optional[str] = None
    ) -> None:
        self.generator, self.tokenizer, self.style = generator, tokenizer, style
        self.params, self.system = params, system
        self.history: list[dict[str, str]] = []

    def run(self) -> None:
        while True:
            try:
                message = read_message()
            except EOFError:  # Ctrl-D
                print()
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, not an exit
                print()
                continue
            command = message.strip()
            if command in ("", "/exit", "/quit"):
                return
            if command == "/reset":
                self.history = []
                print("(conversation reset)", file=sys.stderr)
                continue
            self.reply(message)

    def reply(self, message: str) -> None:
        from lifecycle_cli.errors import UserError
        from lifecycle_cli.generate import format_stats

        self.history.append({"role": "user", "content": message})
        try:
            ids = self.fit()
        except UserError as e:
            self.history.pop()
            print(f"error: {e}", file=sys.stderr)
            return
        print(">> Reply: ", end="", flush=True)
        stream = self.generator.stream(ids, self.params)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            print("\n(reply stopped)", end="", file=sys.stderr)
        print(flush=True)
        self.history.append({"role": "assistant", "content": stream.completion.text})
        print(format_stats(stream.completion), file=sys.stderr, flush=True)

    def fit(self) -> list[int]:
        """The prompt's ids, dropping the oldest exchanges until it leaves room for a reply."""
        from lifecycle_cli.generate import check_prompt_length

        context = self.generator.context
        room = min(self.params.max_new_tokens, context // 2)
        dropped = 0
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            text = self.style.render(system + self.history)
            ids = self.style.encode(self.tokenizer, text)
            if len(ids) + room <= context or len(self.history) <= 1:
                break
            # The oldest user message and the reply to it go together.
            cut = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            self.history = self.history[cut:]
            dropped += cut
        if dropped:
            print(
                f"(dropped the {dropped} oldest messages to fit the context of {context} tokens)",
                file=sys.stderr,
            )
        check_prompt_length(len(ids), context, "your message")
        return ids


def read_message() -> str:
    """One message from stdin; a line that starts with three double quotes opens a message of
    several lines, closed by a line that ends with them."""
    line = input(">> Prompt: ")
    if not line.lstrip().startswith(FENCE):
        return line
    first = line.lstrip()[len(FENCE) :]
    if first.rstrip().endswith(FENCE):  # """one line"""
        return first.rstrip()[: -len(FENCE)]
    lines = [first] if first.strip() else []
    while True:
        line = input()
        if line.rstrip().endswith(FENCE):
            last = line.rstrip()[: -len(FENCE)]
            if last.strip():
                lines.append(last)
            return "\n".join(lines)
        lines.append(line)
