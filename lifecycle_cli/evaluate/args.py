"""The settings of an evaluation run and the flag groups `--judge.*` and `--lm_eval.*`.

No torch here: `llmcycle evaluate --help` builds its parser from these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union


@dataclass
class JudgeArgs:
    """An OpenAI-compatible chat endpoint that judges answers (`judge:` tasks)."""

    url: Optional[str] = None
    """Base URL of the endpoint, e.g. http://127.0.0.1:8000/v1 (`llmcycle serve` is one);
    requests go to URL/chat/completions."""
    model: str = "judge"
    """The model name sent to the endpoint."""
    api_key: Optional[str] = None
    """Bearer token for the endpoint (default: $OPENAI_API_KEY if set)."""
    mode: Literal["single", "pairwise"] = "single"
    """single: a 1-10 score per answer (MT-Bench style). pairwise: each checkpoint after the
    first against the first, both orders (AlpacaEval style win rate)."""
    retries: int = 3
    """Attempts after a failed request (connection error, HTTP error, bad body)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled after each further one."""
    timeout: float = 120.0
    """Seconds to wait for one reply."""
    max_tokens: int = 512
    """Longest verdict the judge may write."""


@dataclass
class LmEvalArgs:
    """lm-evaluation-harness settings (`lm_eval:` tasks)."""

    include_path: Union[Path, list[Path], None] = None
    """A folder (or list of folders) of extra task YAML files, as lm-eval's --include_path."""


@dataclass
class Settings:
    """Everything an evaluation run was asked; written into results.json."""

    limit: Optional[int] = None
    batch_size: int = 8
    num_fewshot: Optional[int] = None
    seed: Optional[int] = None
    stride: Optional[int] = None
    max_new_tokens: Optional[int] = None
    prompt_style: Optional[str] = None
    dev_path: Optional[Path] = None
    apply_chat_template: bool = False
    ref_checkpoint: Optional[Path] = None
    reward_model: Optional[Path] = None
    length_normalize: bool = False
    contamination_of: Optional[list[Path]] = None
    contamination_n: int = 13
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    lm_eval: LmEvalArgs = field(default_factory=LmEvalArgs)

    def as_dict(self) -> dict:
        return asdict(self)
