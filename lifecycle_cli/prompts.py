"""Prompt styles: how a conversation becomes the text a model was trained to continue.

A style renders a list of messages `[{"role": "system"|"user"|"assistant", "content": str}]`
into one prompt string and knows the strings that end a reply. The built-in styles are the
published formats of their families; `chat_template` is the checkpoint tokenizer's own Jinja
template, rendered the way `transformers`' `apply_chat_template` does.

Which style a checkpoint is prompted with (`resolve_style`, the one rule of generate, chat,
serve's /predict and chat routes, and the Python API): an explicit name, else the
`prompt_style.yaml` saved with it (finetune writes it), else its tokenizer's chat template,
else `plain` (the text exactly as given; in a conversation, each message on a line of its own
and each reply after a space). So an instruct checkpoint
(one with a chat template or a recorded style) is prompted the way it was trained, and a base
one gets the raw text; `plain` asks for the raw text on any checkpoint. (Training picks the
style to teach with the same way, but falls back to alpaca.)

For training on a conversation, the reply is what rendering the whole conversation adds to
rendering it without the reply (with the generation prompt):

    prompt = style.render(messages[:-1]); full = style.render(messages, add_generation_prompt=False)
    reply = full[len(prompt):]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    from lifecycle_cli.tokenizer import Tokenizer

PROMPT_STYLE_FILE = "prompt_style.yaml"
CHAT_TEMPLATE = "chat_template"
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_INPUT_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
Message = dict[str, str]


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """The messages as plain dicts, or a UserError naming the first malformed one."""
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise UserError(
                f"message {i + 1}: expected {{'role': 'system'|'user'|'assistant', "
                f"'content': str}}, got {m!r}"
            )
        if role == "system" and i > 0:
            raise UserError(f"message {i + 1}: a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def _split_system(messages: Sequence[Message]) -> tuple[Optional[str], list[Message]]:
    messages = check_messages(messages)
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


@dataclass
class PromptStyle:
    """A conversation format. `stop`: strings that end a reply (special tokens among them are
    also caught as token ids). `bos_token`/`eos_token` are the tokenizer's, for the formats that
    write them between turns."""

    name: str = "plain"
    stop: tuple[str, ...] = ()
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; with `add_generation_prompt` it ends where the
        assistant's next reply begins."""
        system, turns = _split_system(messages)
        return self._render(system, turns, add_generation_prompt)

    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        # plain: the contents one per line; a single prompt is left exactly as given. A reply
        # starts with a space: a byte-level BPE without a prefix space gives a word after a
        # newline other tokens than the same word after a space ("ghi" -> gh|i, " ghi" -> " g"|hi),
        # so a reply that repeats words of its prompt would first have to learn to respell them.
        parts = [system] if system else []
        for m in turns:
            text = m["content"]
            spaced = m["role"] == "assistant" and text[:1].strip()  # not empty, no space first
            parts.append(" " + text if spaced else text)
        return "\n".join(parts)

    def apply(self, prompt: str, system: Optional[str] = None, **fields: str) -> str:
        """One user message (and optional system prompt) as a prompt ready for the reply."""
        messages = [{"role": "system", "content": system}] if system else []
        return self.render([*messages, {"role": "user", "content": prompt}])

    def encode(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """Token ids of a rendered prompt. Built-in styles write no beginning-of-sequence token:
        the tokenizer adds it the way it always does."""
        return tokenizer.encode(text)


class Alpaca(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        out = (system or ALPACA_SYSTEM) + "\n\n"
        for i, m in enumerate(turns):
            if m["role"] == "user":
                sep = "\n\n" if i else ""
                out += f"{sep}### Instruction:\n{m['content']}\n\n### Response:\n"
            else:
                out += m["content"]
        return out

    def apply(self, prompt: str, system: Optional[str] = None, **fields: str) -> str:
        """Alpaca's own form: `input` (if any) goes in its own section, as in the dataset."""
        extra = fields.get("input")
        if not extra:
            return super().apply(prompt, system)
        return (
            f"{system or ALPACA_INPUT_SYSTEM}\n\n### Instruction:\n{prompt}\n\n"
            f"### Input:\n{extra}\n\n### Response:\n"
        )


class ChatML(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if gen else "")


class Qwen(ChatML):
    """Qwen2.5's template: ChatML with a system prompt of its own when none is given."""

    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        return super()._render(QWEN_SYSTEM if system is None else system, turns, gen)


class Llama3(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        out = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in messages
        )
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


class Llama2(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        out = ""
        for i, m in enumerate(turns):
            content = m["content"].strip()
            if m["role"] == "user":
                if i == 0 and system:
                    content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
                out += f"{self.bos_token if i else ''}[INST] {content} [/INST]"
            else:
                out += f" {content} {self.eos_token}"
        return out


class Mistral(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        out = ""
        for i, m in enumerate(turns):
            content = m["content"]
            if m["role"] == "user":
                if i == 0 and system:
                    content = f"{system}\n\n{content}"
                out += f"[INST] {content} [/INST]"
            else:
                out += f"{content}{self.eos_token}"
        return out


class Phi3(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        # Phi-3's template ends a finished conversation with eos.
        return out + ("<|assistant|>\n" if gen else self.eos_token)


class Gemma(PromptStyle):
    def _render(self, system: Optional[str], turns: list[Message], gen: bool) -> str:
        out = ""
        for i, m in enumerate(turns):
            role = "model" if m["role"] == "assistant" else "user"
            content = m["content"]
            if i == 0 and system:  # Gemma has no system role: it leads the first user turn
                content = f"{system}\n\n{content}"
            out += f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
        return out + ("<start_of_turn>model\n" if gen else "")


class ChatTemplate(PromptStyle):
    """The tokenizer's Jinja `chat_template`, rendered like transformers' apply_chat_template."""

    def __init__(self, template: str, tokenizer: Tokenizer) -> None:
        super().__init__(CHAT_TEMPLATE, _template_stops(template, tokenizer))
        self.template = template
        self.special = _special_token_strings(tokenizer)
        self.bos_token = self.special.get("bos_token", "")
        self.eos_token = self.special.get("eos_token", "")
        self._compiled = None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        import jinja2

        messages = check_messages(messages)
        try:
            if self._compiled is None:
                self._compiled = _jinja_env().from_string(self.template)
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the tokenizer's chat template failed: {e}") from None

    def encode(self, tokenizer: Tokenizer, text: str) -> list[int]:
        # Templates write their own bos; like apply_chat_template, the tokenizer adds none.
        return tokenizer.encode(text, bos=False)


BUILTIN: dict[str, PromptStyle] = {
    "plain": PromptStyle("plain"),
    "alpaca": Alpaca("alpaca", ("\n\n### Instruction:", "\n### Instruction:", "### Instruction:")),
    "chatml": ChatML("chatml", ("<|im_end|>", "<|im_start|>")),
    "qwen": Qwen("qwen", ("<|im_end|>", "<|im_start|>")),
    "llama3": Llama3("llama3", ("<|eot_id|>", "<|start_header_id|>")),
    "llama2": Llama2("llama2", ("[INST]",)),
    "mistral": Mistral("mistral", ("[INST]",)),
    "phi3": Phi3("phi3", ("<|end|>", "<|user|>", "<|endoftext|>")),
    "gemma": Gemma("gemma", ("<end_of_turn>", "<start_of_turn>")),
}
# LitGPT's class names in its prompt_style.yaml (`class_path: litgpt.prompts.X`).
LITGPT_NAMES = {
    "default": "plain",
    "alpaca": "alpaca",
    "chatml": "chatml",
    "qwen2_5": "qwen",
    "qwen2_5_math": "qwen",
    "llama3": "llama3",
    "llama2": "llama2",
    "llama2functioncalling": "llama2",
    "mistral": "mistral",
    "phi3": "phi3",
    "gemma": "gemma",
}


# Other names accepted for a style.
ALIASES = {"raw": "plain"}


def style_names() -> list[str]:
    return [*BUILTIN, CHAT_TEMPLATE]


def get_style(name: str, tokenizer: Optional[Tokenizer] = None) -> PromptStyle:
    """The style called `name` ('chat_template': the tokenizer's own template)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key == CHAT_TEMPLATE:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            where = f" in {tokenizer.checkpoint_dir}" if tokenizer is not None else ""
            raise UserError(f"prompt style 'chat_template': the tokenizer{where} has none")
        return ChatTemplate(template, tokenizer)
    if key not in BUILTIN:
        raise UserError(f"unknown prompt style {name!r} (choose from {', '.join(style_names())})")
    base = BUILTIN[key]
    special = _special_token_strings(tokenizer) if tokenizer is not None else {}
    style = type(base)(base.name, base.stop)
    style.bos_token = special.get("bos_token", "<s>")
    style.eos_token = special.get("eos_token", "</s>")
    return style


def read_style_file(checkpoint_dir: Path | str) -> Optional[str]:
    """The style name in a checkpoint's prompt_style.yaml, or None when there is no file.

    Reads ours (`name: alpaca`) and LitGPT's (`class_path: litgpt.prompts.Alpaca`)."""
    path = Path(checkpoint_dir) / PROMPT_STYLE_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return data["name"]
    if isinstance(data, dict) and isinstance(data.get("class_path"), str):
        cls = data["class_path"].rsplit(".", 1)[-1].lower()
        if cls in LITGPT_NAMES:
            return LITGPT_NAMES[cls]
        raise UserError(f"{path}: LitGPT prompt style {data['class_path']!r} is not supported")
    raise UserError(f"{path}: expected `name: <style>` (one of {', '.join(style_names())})")


def save_prompt_style(style: str | PromptStyle, checkpoint_dir: Path | str) -> Path:
    """Record the style a checkpoint was trained with, so chat and serve format prompts alike."""
    name = style.name if isinstance(style, PromptStyle) else style
    if name != CHAT_TEMPLATE:
        get_style(name)  # an unknown name fails here, not when the checkpoint is used
    path = Path(checkpoint_dir) / PROMPT_STYLE_FILE
    path.write_text(yaml.safe_dump({"name": name}), encoding="utf-8")
    return path


def resolve_style(
    checkpoint_dir: Optional[Path | str],
    tokenizer: Optional[Tokenizer],
    name: Optional[str] = None,
) -> PromptStyle:
    """The style to use for a checkpoint: `name` when given ('auto' counts as not given), else
    the checkpoint's prompt_style.yaml, else the tokenizer's chat template, else `plain`."""
    if name is not None and name.strip().lower() != "auto":
        return get_style(name, tokenizer)
    saved = read_style_file(checkpoint_dir) if checkpoint_dir is not None else None
    if saved is not None:
        return get_style(saved, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return get_style(CHAT_TEMPLATE, tokenizer)
    return get_style("plain", tokenizer)


def style_folder(checkpoint_dir: Path | str, adapter: Optional[Path | str] = None) -> Path:
    """Where the prompt style of a model is read: the adapter's run when it recorded one (it
    was trained in that style), else the checkpoint."""
    from lifecycle_cli.lora import find_adapter

    if adapter is not None:
        _, final = find_adapter(adapter)
        if final is not None and (final / PROMPT_STYLE_FILE).is_file():
            return final
    return Path(checkpoint_dir)


# --------------------------------------------------------------------------------------------
# Jinja


def _jinja_env():
    """The environment transformers renders chat templates in."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _special_token_strings(tokenizer: Tokenizer) -> dict[str, str]:
    out = {}
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if token_id is not None:
            out[key] = tokenizer.id_to_token(token_id) or ""
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None:
        out["pad_token"] = tokenizer.id_to_token(pad) or ""
    return out


def _template_stops(template: str, tokenizer: Tokenizer) -> tuple[str, ...]:
    """The end-of-turn token a template writes after an assistant reply (e.g. <|im_end|>,
    <|eot_id|>, <end_of_turn>), found by rendering a sample exchange: the first token after the
    reply, if it is a special token."""
    marker = "\x00reply\x00"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        env = _jinja_env()
        text = env.from_string(template).render(
            messages=messages, add_generation_prompt=False, **_special_token_strings(tokenizer)
        )
    except Exception:  # a template that refuses this sample: rely on the eos ids alone
        return ()
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer.encode(after, bos=False) if after else []
    if ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == "":
        token = tokenizer.id_to_token(ids[0])
        return (token,) if token else ()
    return ()
