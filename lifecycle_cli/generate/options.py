"""`SamplingParams`: how one request is sampled and when it stops, defined and checked once.

No torch here: the HTTP process of `serve` builds these from request bodies, and the verbs check
their flags with them before a model loads.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Optional, TypeVar, Union

from lifecycle_cli.errors import UserError


class SamplingError(UserError):
    """A bad sampling value; `field` names it (the flag of a verb, the field of a request)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one row is sampled and when it stops.

    temperature 0 is greedy decoding. top_k None, top_p 1 and min_p 0 leave the distribution
    whole. repetition_penalty > 1 makes tokens already in the prompt or the output less likely
    (as in transformers: positive logits divided, negative ones multiplied). A row stops at the
    tokenizer's end-of-sequence ids (unless `ignore_eos`), at any of `stop_token_ids`, at any of
    the `stop` strings (which are not part of the output) or after `max_new_tokens`. `seed`
    gives the row its own random generator: the same tokens whatever else is in the batch.
    """

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are welcome from callers; keep the dataclass hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        for f in fields(self):
            _check(f.name, getattr(self, f.name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        from dataclasses import replace

        return replace(self, **changes)

    @classmethod
    def pick(
        cls, values: Mapping[str, Any], *, flags: bool = False, **overrides: Any
    ) -> SamplingParams:
        """The settings among `values` (a verb's `locals()`, say), with `overrides`. flags: the
        values are a verb's flags, and a bad one is reported as `--name`."""
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})
        except SamplingError as e:
            if not flags:
                raise
            raise SamplingError(e.field, f"--{e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(name: str, value: Any) -> None:
    """One rule per field, one message per bad value."""
    if name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SamplingError(name, f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SamplingError(name, f"{name} must be a finite number, got {value}")
    if name == "max_new_tokens" and not _is_int(value):
        raise SamplingError(name, f"max_new_tokens must be an integer, got {value!r}")
    if name == "max_new_tokens" and value < 1:
        raise SamplingError(name, f"max_new_tokens must be at least 1, got {value}")
    if name == "temperature" and value < 0:
        raise SamplingError(name, f"temperature must be >= 0, got {value:g}")
    if name == "top_k" and value is not None and not (_is_int(value) and value >= 1):
        raise SamplingError(name, f"top_k must be an integer >= 1 (or unset), got {value!r}")
    if name == "top_p" and not 0 < value <= 1:
        raise SamplingError(name, f"top_p must be in (0, 1], got {value:g}")
    if name == "min_p" and not 0 <= value < 1:
        raise SamplingError(name, f"min_p must be in [0, 1), got {value:g}")
    if name == "repetition_penalty" and value <= 0:
        raise SamplingError(name, f"repetition_penalty must be > 0, got {value:g}")
    if name == "seed" and value is not None and not (_is_int(value) and 0 <= value < 2**63):
        raise SamplingError(name, f"seed must be an integer in [0, 2**63), got {value!r}")
    if name == "stop":
        if not all(isinstance(s, str) for s in value):
            raise SamplingError(name, "stop must be a string or a list of strings")
        if any(not s for s in value):
            raise SamplingError(name, "stop strings must not be empty")
    if name == "stop_token_ids" and not all(_is_int(t) and t >= 0 for t in value):
        raise SamplingError(name, f"stop_token_ids must be token ids, got {list(value)!r}")


GREEDY = SamplingParams(temperature=0.0, top_k=None)


def check_prompt_length(n_tokens: int, context: int, what: str = "the prompt") -> None:
    """A UserError naming both lengths when `n_tokens` leaves no room to generate."""
    if n_tokens == 0:
        raise UserError(f"{what} is empty: there is nothing to continue")
    if n_tokens >= context:
        raise UserError(
            f"{what} is {n_tokens} tokens but the model's context is {context} tokens; "
            f"shorten it to at most {context - 1} tokens to leave room for the reply"
        )


QUANTIZE_FORMATS = ("int8", "int4")  # weight-only inference formats (generate/quantized.py)


def check_quantize(quantize: Optional[str], flag: str = "--quantize") -> None:
    """`--quantize` names a format (or is unset)."""
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise UserError(f"{flag} {quantize!r} is not a format: choose int8 or int4")


# The flags `generate` and `chat` share: SamplingParams fields, their types and their help.
FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("max_new_tokens", int, "At most this many new tokens (fewer if the context runs out)."),
    (
        "temperature",
        float,
        "Sampling temperature; 0 picks the most likely token every time (greedy).",
    ),
    ("top_k", Optional[int], "Sample only among the k most likely tokens (null: all)."),
    (
        "top_p",
        float,
        "Sample only among the most likely tokens that together hold this probability.",
    ),
    ("min_p", float, "Drop tokens less likely than min_p times the most likely one (0: off)."),
    (
        "repetition_penalty",
        float,
        "Above 1, tokens already in the prompt (the conversation) or output become less likely.",
    ),
    ("seed", Optional[int], "Random seed, for output that repeats run after run (unset: differs)."),
    (
        "stop",
        Union[list[str], str],
        'A string (or a list, `--stop \'["a", "b"]\'`) that ends the output, besides the '
        "prompt style's own end-of-turn markers; it is not printed. `\\n` and `\\t` stand for "
        "newline and tab.",
    ),
)

Verb = TypeVar("Verb", bound=Callable[..., Any])


def sampling_flags(verb: Verb) -> Verb:
    """Give a verb that takes `**sampling` the sampling flags: its signature (what the command
    line parser reads) gains `FLAGS` as keyword parameters with SamplingParams' defaults, and the
    `{sampling}` line of its docstring (among the Args) their help."""
    defaults = {f.name: f.default for f in fields(SamplingParams) if f.default is not MISSING}
    signature = inspect.signature(verb)
    own = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    extra = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name], annotation=t
        )
        for name, t, _ in FLAGS
    ]
    verb.__signature__ = signature.replace(parameters=own + extra)
    # typing.get_type_hints reads __annotations__, not the signature.
    verb.__annotations__ = {**verb.__annotations__, **{name: t for name, t, _ in FLAGS}}
    doc = verb.__doc__ or ""
    at = doc.find("{sampling}")
    if at >= 0:  # the help, indented as the placeholder is
        indent = " " * (at - doc.rfind("\n", 0, at) - 1)
        lines = "\n".join(f"{indent}{name}: {help}" for name, _, help in FLAGS)
        verb.__doc__ = doc[: doc.rfind("\n", 0, at) + 1] + lines + doc[at + len("{sampling}") :]
    return verb


def from_flags(sampling: Mapping[str, Any]) -> SamplingParams:
    """The sampling flags of a verb (see `sampling_flags`) as settings; a bad value is one
    line naming its flag."""
    return SamplingParams.pick(sampling, flags=True, stop=cli_stops(sampling.get("stop")))


def unescape(text: str) -> str:
    """`\\n` and `\\t` typed on a command line as newline and tab (`\\\\` is a backslash)."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def cli_stops(stop: Any) -> tuple[str, ...]:
    """`--stop` as the verbs take it (one string or a list, with `\\n`/`\\t` escapes)."""
    return tuple(unescape(s) for s in ([stop] if isinstance(stop, str) else stop or ()) if s)
