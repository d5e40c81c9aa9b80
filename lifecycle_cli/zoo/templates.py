"""The built-in prompt styles (prompts.py) written as the templates other runtimes read: Jinja
for a GGUF's tokenizer.chat_template (llama.cpp renders it), Go templates for an Ollama Modelfile.

Each Jinja template renders a conversation to exactly the text `PromptStyle.render` gives
(tests/test_gguf.py checks every style); bos_token and eos_token are the runtime's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lifecycle_cli.errors import UserError
from lifecycle_cli.prompts import ALPACA_SYSTEM, CHAT_TEMPLATE, QWEN_SYSTEM

# Split the system message off, as PromptStyle.render does: `system` ('' when none), `turns`.
_SPLIT = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
)
_CHATML_TURNS = (
    "{% if system %}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{% endif %}"
    "{% for m in turns %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

JINJA = {
    "plain": _SPLIT
    + (
        "{% if system %}{{ system }}{% if turns %}{{ '\\n' }}{% endif %}{% endif %}"
        "{% for m in turns %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
        "{% set c = m['content'] %}{% if m['role'] == 'assistant' and c[:1].strip() %}"
        "{{ ' ' }}{% endif %}{{ c }}{% endfor %}"
    ),
    "alpaca": _SPLIT
    + (
        "{{ (system or " + repr(ALPACA_SYSTEM) + ") + '\\n\\n' }}"
        "{% for m in turns %}{% if m['role'] == 'user' %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    ),
    "chatml": _SPLIT + _CHATML_TURNS,
    "qwen": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = " + repr(QWEN_SYSTEM) + " %}{% set turns = messages %}"
        "{% endif %}" + _CHATML_TURNS
    ),
    "llama3": _SPLIT
    + (
        "{% if system %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system.strip()"
        " + '<|eot_id|>' }}{% endif %}{% for m in turns %}{{ '<|start_header_id|>' + m['role']"
        " + '<|end_header_id|>\\n\\n' + m['content'].strip() + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "llama2": _SPLIT
    + (
        "{% for m in turns %}{% set content = m['content'].strip() %}"
        "{% if m['role'] == 'user' %}{% if loop.first and system %}"
        "{% set content = '<<SYS>>\\n' + system.strip() + '\\n<</SYS>>\\n\\n' + content %}"
        "{% endif %}{% if not loop.first %}{{ bos_token }}{% endif %}"
        "{{ '[INST] ' + content + ' [/INST]' }}"
        "{% else %}{{ ' ' + content + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "mistral": _SPLIT
    + (
        "{% for m in turns %}{% set content = m['content'] %}"
        "{% if m['role'] == 'user' %}{% if loop.first and system %}"
        "{% set content = system + '\\n\\n' + content %}{% endif %}"
        "{{ '[INST] ' + content + ' [/INST]' }}"
        "{% else %}{{ content + eos_token }}{% endif %}{% endfor %}"
    ),
    "phi3": _SPLIT
    + (
        "{% if system %}{{ '<|system|>\\n' + system + '<|end|>\\n' }}{% endif %}"
        "{% for m in turns %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
        "{% else %}{{ eos_token }}{% endif %}"
    ),
    "gemma": _SPLIT
    + (
        "{% for m in turns %}{% set content = m['content'] %}"
        "{% if loop.first and system %}{% set content = system + '\\n\\n' + content %}{% endif %}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n'"
        " + content + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


def jinja_template(style: str) -> str:
    """The Jinja chat template of a built-in prompt style."""
    if style not in JINJA:
        raise UserError(f"prompt style {style!r} has no chat template to write")
    return JINJA[style]


# Ollama's templates: .Messages (Role, Content) with .System, ending where the reply begins.
# `$last` marks the final message, after which the assistant's turn is opened.
_GO_CHATML = (
    "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}'
)
GO = {
    "plain": (
        "{{- range $i, $_ := .Messages }}{{ if $i }}\n{{ end }}"
        '{{ if and (eq .Role "assistant") .Content (ne (slice .Content 0 1) " ")'
        ' (ne (slice .Content 0 1) "\\n") }} {{ end }}{{ .Content }}{{- end }}'
    ),
    "chatml": _GO_CHATML,
    "qwen": '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
    "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n{{ end }}" + _GO_CHATML,
    "llama3": (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>'
        "\n\n{{ end }}{{- end }}"
    ),
    "phi3": (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
        '{{ if and $last (ne .Role "assistant") }}<|assistant|>\n{{ end }}{{- end }}'
    ),
    "gemma": (
        '{{- $system := "" }}{{- range $i, $_ := .Messages }}'
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{- if eq .Role "system" }}{{ $system = .Content }}{{- else }}'
        '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
        '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
        '{{ if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}'
        "{{- end }}{{- end }}"
    ),
    "alpaca": (
        "{{ if .System }}{{ .System }}{{ else }}" + ALPACA_SYSTEM + "{{ end }}\n\n"
        "{{- $seen := false }}{{- range .Messages }}"
        '{{- if eq .Role "user" }}{{ if $seen }}\n\n{{ end }}'
        "### Instruction:\n{{ .Content }}\n\n### Response:\n{{ $seen = true }}"
        '{{- else if eq .Role "assistant" }}{{ .Content }}{{- end }}{{- end }}'
    ),
}


def go_template(style: str) -> Optional[str]:
    """The Ollama (Go) template of a built-in prompt style; None where there is none."""
    return GO.get(style)


SAMPLES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
)  # fmt: skip


def builtin_style_of(checkpoint_dir: Path) -> tuple[Optional[str], tuple[str, ...]]:
    """(the built-in style a checkpoint's prompts are formatted in, or None when its chat
    template is none of them; the strings that end a reply)."""
    from lifecycle_cli.prompts import BUILTIN, get_style, read_style_file, resolve_style
    from lifecycle_cli.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    name = read_style_file(checkpoint_dir)
    style = resolve_style(checkpoint_dir, tokenizer)
    stops = tuple(dict.fromkeys([*style.stop, *(tokenizer.decode([i]) for i in tokenizer.eos_ids)]))
    if name is not None and name != CHAT_TEMPLATE:
        return name, stops
    if style.name != CHAT_TEMPLATE:
        return style.name, stops
    for candidate in BUILTIN:  # a chat template that renders like a built-in style is that style
        builtin = get_style(candidate, tokenizer)
        if all(builtin.render(m) == style.render(m) for m in SAMPLES):
            return candidate, stops
    return None, stops


def modelfile(checkpoint_dir: Path, gguf_file: Path) -> str:
    """An Ollama Modelfile for a GGUF exported from `checkpoint_dir`: FROM, TEMPLATE (the
    prompt style in Ollama's Go template syntax), stop strings, sampling defaults from
    generation_config.json."""
    style, stops = builtin_style_of(checkpoint_dir)
    lines = [f"# Written by llmcycle convert to_gguf --ollama from {checkpoint_dir}", ""]
    lines.append(f"FROM ./{gguf_file.name}")
    template = go_template(style) if style else None
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:  # Ollama then picks a template from the GGUF's own chat template
        lines.insert(1, f"# prompt style {style or 'chat_template'}: no Go template; Ollama reads"
                        " the GGUF's chat template")  # fmt: skip
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops if s]
    generation = {}
    path = checkpoint_dir / "generation_config.json"
    if path.is_file():
        generation = json.loads(path.read_text(encoding="utf-8"))
    sampling = {
        "temperature": 0.0
        if generation.get("do_sample") is False
        else generation.get("temperature"),
        "top_p": generation.get("top_p"),
        "top_k": generation.get("top_k"),
        "repeat_penalty": generation.get("repetition_penalty"),
    }
    lines += [f"PARAMETER {k} {v}" for k, v in sampling.items() if v is not None]
    return "\n".join(lines) + "\n"
