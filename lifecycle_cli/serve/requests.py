"""Request checks (in the HTTP process, no torch): each body is checked field by field and
becomes a job, `{"ids": [...], "params": SamplingParams}`. Anything wrong is a `RequestError`: a
4xx JSON error in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, whose
`param` names the field.

Values are checked by `SamplingParams` (the rules the verbs use); this module checks JSON types,
maps the OpenAI and LitGPT field names onto the settings, and refuses the OpenAI fields it does
not implement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from lifecycle_cli.errors import UserError
from lifecycle_cli.generate.options import SamplingError, SamplingParams, check_prompt_length

if TYPE_CHECKING:
    from lifecycle_cli.prompts import PromptStyle
    from lifecycle_cli.tokenizer import Tokenizer

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_STOPS = 16
# Fields of the OpenAI API this server does not implement, and the values that mean "off".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}


# --------------------------------------------------------------------------------------------
# Errors


class RequestError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message, param, status, code, kind,
        )  # fmt: skip

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(
    status: int,
    message: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    kind: str = "invalid_request_error",
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


# --------------------------------------------------------------------------------------------
# Request fields


def _get_int(body: dict, name: str) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{name}` must be an integer, got {_json_type(value)}", name)
    return value


def _get_number(body: dict, name: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"`{name}` must be a number, got {_json_type(value)}", name)
    return float(value)


def _get_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"`{name}` must be true or false, got {_json_type(value)}", name)
    return value


def _get_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(
            f"`stop` must be a string or an array of strings, got {_json_type(value)}", "stop"
        )
    if len(stops) > MAX_STOPS:
        raise RequestError(f"`stop` holds {len(stops)} strings; at most {MAX_STOPS}", "stop")
    return stops


@dataclass(frozen=True)
class Defaults:
    """A route's sampling defaults (each API has its own conventions)."""

    max_tokens: Optional[int]  # None: as many as the server's limit and the context allow
    temperature: float
    top_k: Optional[int]


OPENAI_CHAT = Defaults(max_tokens=None, temperature=1.0, top_k=None)
OPENAI_COMPLETIONS = Defaults(max_tokens=16, temperature=1.0, top_k=None)  # OpenAI's default 16
LITGPT_PREDICT = Defaults(max_tokens=50, temperature=0.8, top_k=50)  # `litgpt serve`'s defaults


@dataclass
class Options:
    """What a route needs to know about a request besides the job."""

    stream: bool = False
    include_usage: bool = False


@dataclass
class ModelInfo:
    """What the HTTP process knows of the model: enough to check and tokenize requests."""

    name: str
    aliases: tuple[str, ...]
    tokenizer: Tokenizer
    context: int
    style: PromptStyle  # how chat messages and /predict prompts become a prompt
    max_new_tokens_limit: int


async def read_body(request: Request) -> dict:
    """The JSON object a request carries (413 past MAX_BODY_BYTES)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise RequestError(
            f"the request body must be a JSON object, got {_json_type(body)}", "body"
        )
    return body


class Requests:
    """Request bodies -> (job, Options) for each route, every field checked."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise RequestError(f"`model` must be a string, got {_json_type(model)}", "model")
        if model not in self.info.aliases:
            raise RequestError(
                f"model {model!r} does not exist here; this server has {self.info.name!r}",
                "model",
                status=404,
                code="model_not_found",
            )

    @staticmethod
    def _check_unsupported(body: dict) -> None:
        n = _get_int(body, "n")
        if n is not None and n != 1:
            raise RequestError(f"`n` must be 1 (one choice per request), got {n}", "n")
        for name, off in UNSUPPORTED.items():
            if name in body and not any(body[name] == v for v in off):
                raise RequestError(f"`{name}` is not supported by this server", name)
        response_format = body.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            raise RequestError(
                '`response_format` other than {"type": "text"} is not supported by this '
                "server (no JSON mode or schemas)",
                "response_format",
            )

    def _job(
        self, body: dict, ids: list[int], field: str, defaults: Defaults, max_names: tuple[str, ...]
    ) -> dict:
        """Sampling fields + prompt ids -> a job; values are checked by `SamplingParams`, and a
        bad one is refused naming the request's own field."""
        info = self.info
        try:
            check_prompt_length(len(ids), info.context, f"`{field}`")
        except UserError as e:
            raise RequestError(
                str(e), field, code="context_length_exceeded" if ids else None
            ) from None
        max_tokens, name = None, max_names[0]
        for candidate in max_names:
            value = _get_int(body, candidate)
            if value is not None:
                max_tokens, name = value, candidate
                break
        if max_tokens is not None and max_tokens > info.max_new_tokens_limit:
            raise RequestError(
                f"`{name}` is {max_tokens} but this server allows at most "
                f"{info.max_new_tokens_limit} new tokens (--max_new_tokens_limit)",
                name,
            )
        if max_tokens is None:
            max_tokens = min(defaults.max_tokens or info.max_new_tokens_limit,
                             info.max_new_tokens_limit)  # fmt: skip
        names = {"max_new_tokens": name}  # setting -> the field it came from
        settings: dict[str, Any] = {"max_new_tokens": max_tokens}
        for setting, default in (
            ("temperature", defaults.temperature), ("top_p", 1.0), ("min_p", 0.0),
            ("repetition_penalty", 1.0),
        ):  # fmt: skip
            value = _get_number(body, setting)
            settings[setting] = default if value is None else value
        settings["top_k"] = _get_int(body, "top_k") if "top_k" in body else defaults.top_k
        settings["seed"] = _get_int(body, "seed")
        settings["stop"] = tuple(_get_stop(body))
        settings["ignore_eos"] = _get_bool(body, "ignore_eos")
        try:
            params = SamplingParams(**settings)
        except SamplingError as e:
            where = names.get(e.field, e.field)
            raise RequestError(str(e).replace(e.field, f"`{where}`", 1), where) from None
        return {"ids": ids, "params": params}

    @staticmethod
    def _with_stops(job: dict, stops: tuple[str, ...]) -> dict:
        """The prompt style's end-of-turn strings added to the request's own."""
        params = job["params"]
        return {**job, "params": params.replace(stop=params.stop + tuple(stops))}

    def _options(self, body: dict) -> Options:
        stream = _get_bool(body, "stream")
        usage = body.get("stream_options")
        include = False
        if usage is not None:
            if not isinstance(usage, dict):
                raise RequestError("`stream_options` must be an object", "stream_options")
            include = _get_bool(usage, "include_usage")
        return Options(stream=stream, include_usage=include)

    def _encode_prompt(self, body: dict) -> list[int]:
        """`prompt` of /v1/completions: a string, or token ids (one prompt per request)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.info.tokenizer.encode(prompt)
        vocab = self.info.tokenizer.vocab_size
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt
        ):
            return list(prompt)
        if prompt is None:
            raise RequestError("`prompt` is required", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError("`prompt` must be one prompt per request (n = 1)", "prompt")
        raise RequestError(
            f"`prompt` must be a string or an array of token ids in [0, {vocab}), "
            f"got {_json_type(prompt)}",
            "prompt",
        )

    def _chat_messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            got = "none" if messages is None else _json_type(messages)
            raise RequestError(
                f"`messages` must be a non-empty array of messages, got {got}", "messages"
            )
        out = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise RequestError(f"`{where}` must be an object, got {_json_type(m)}", where)
            role = m.get("role")
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise RequestError(
                    f"`{where}.role` must be system, developer, user or assistant, got {role!r}",
                    f"{where}.role",
                )
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):  # fmt: skip
                        raise RequestError(
                            f"`{where}.content` parts must be {{'type': 'text', 'text': str}}",
                            f"{where}.content",
                        )
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise RequestError(
                    f"`{where}.content` must be a string, got {_json_type(content)}",
                    f"{where}.content",
                )
            out.append({"role": role, "content": content})
        return out

    def parse_completion(self, body: dict) -> tuple[dict, Options]:
        self.check_model(body)
        self._check_unsupported(body)
        job = self._job(
            body, self._encode_prompt(body), "prompt", OPENAI_COMPLETIONS, ("max_tokens",)
        )
        return job, self._options(body)

    def parse_chat(self, body: dict) -> tuple[dict, Options]:
        self.check_model(body)
        self._check_unsupported(body)
        messages = self._chat_messages(body)
        style = self.info.style
        try:
            ids = style.encode(self.info.tokenizer, style.render(messages))
        except UserError as e:
            raise RequestError(f"`messages`: {e}", "messages") from None
        names = ("max_completion_tokens", "max_tokens")
        job = self._job(body, ids, "messages", OPENAI_CHAT, names)
        return self._with_stops(job, style.stop), self._options(body)

    def parse_predict(self, body: dict) -> tuple[dict, Options]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            got = "none" if prompt is None else _json_type(prompt)
            raise RequestError(f"`prompt` must be a string, got {got}", "prompt")
        style = self.info.style
        ids = style.encode(self.info.tokenizer, style.apply(prompt))
        job = self._job(body, ids, "prompt", LITGPT_PREDICT, ("max_new_tokens", "max_tokens"))
        return self._with_stops(job, style.stop), self._options(body)
