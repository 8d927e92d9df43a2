"""The subset of the OpenAI HTTP API that `tunesmith serve` speaks: request models, response
builders and OpenAI-style error JSON.

Requests are validated strictly. Fields the OpenAI API defines that do not change what is
generated (`user`, `store`, `metadata`, `presence_penalty: 0` ...) are accepted and ignored;
fields that would change the output in a way this server cannot honour (`tools`,
`response_format: json_object`, non-zero penalties ...) are a 400 that says so; `logprobs` /
`top_logprobs` (chat) and `logprobs` / `echo` (completions) follow OpenAI's ranges and rules;
a field OpenAI does not define at all is a 400 naming the closest valid one, as OpenAI does.
"""
from __future__ import annotations

import difflib
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.serve.logprobs import MAX_TOP_CHAT, MAX_TOP_LEGACY

SEED_RANGE = 2 ** 63  # seeds are taken modulo this, so seed + choice index never overflows


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    # Unknown keys are refused: top-level ones by parse_request (with a suggestion), nested ones here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)  # accepted; chat templates ignore it
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-SEED_RANGE, lt=SEED_RANGE)
    # Harmless OpenAI fields: accepted, and only their neutral values where they have one.
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(len(s) > 256 for s in stops):
            raise ValueError("a stop sequence may be at most 256 characters long")
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def choice_seed(self, index: int) -> int | None:
        return None if self.seed is None else (self.seed + index) % SEED_RANGE


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_CHAT)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools or self.functions or self.tool_choice not in (None, "none") \
                or self.function_call not in (None, "none"):
            raise ValueError("tools and function calling are not supported by this server")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported by this server")
        if self.modalities and self.modalities != ["text"]:
            raise ValueError("modalities: only [\"text\"] is supported by this server")
        if self.reasoning_effort is not None:
            raise ValueError("reasoning_effort is not supported by this server")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top(self) -> int | None:
        """The engine's logprobs setting: None (none), else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        """Messages as the chat template expects them (`developer` is OpenAI's new name for `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt, generate nothing
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LEGACY, strict=True)  # a count, not a flag
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; it is only allowed with echo (to score the prompt)")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server (only best_of == n)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids given by the client."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: tuple) -> str:
    # pydantic puts union-member names ("str", "list[TextPart]", "function-after[...]") in loc;
    # the client only cares about the field names and list positions.
    parts = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x.isidentifier() and x not in _UNION_TAGS:
            parts.append(("." if parts else "") + x)
    return "".join(parts)


def _unknown_field(model: type[BaseModel], key: str) -> APIError:
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return APIError(400, f"Unrecognized request argument supplied: {key}{hint}", param=key,
                    code="unrecognized_argument")


def parse_request(model: type[BaseModel], payload: Any):
    """A validated request, or an APIError(400) naming the field and what is wrong with it."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(payload).__name__}")
    for key in payload:
        if key not in model.model_fields:
            raise _unknown_field(model, str(key))
    # OpenAI's fields are nullable: null means "the default" (clients send "n": null, "seed": null ...)
    payload = {k: v for k, v in payload.items() if v is not None}
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        path = _field_path(err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unrecognized field"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        if not path:  # a whole-request check: its message starts with the field it is about
            field = next((f for f in sorted(model.model_fields, key=len, reverse=True) if msg.startswith(f)), None)
            raise APIError(400, f"{msg}{more}", param=field, code="unsupported_value") from None
        raise APIError(400, f"{path}: {msg}{more}", param=path, code="invalid_value") from None


# ---------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tunesmith"}


def chat_completion(rid: str, created: int, model: str, choices: list[tuple], use: dict) -> dict:
    """choices: (text, finish_reason[, logprobs]) per index; logprobs: the `content` list or None."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": chat_logprobs(lp[0] if lp else None), "finish_reason": fin}
                        for i, (text, fin, *lp) in enumerate(choices)],
            "usage": use}


def chat_logprobs(content: list[dict] | None) -> dict | None:
    return None if content is None else {"content": content, "refusal": None}


def text_completion(rid: str, created: int, model: str, choices: list[tuple], use: dict) -> dict:
    """choices: (text, finish_reason[, logprobs]) per index; logprobs: the legacy object or None."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": lp[0] if lp else None, "finish_reason": fin}
                        for i, (text, fin, *lp) in enumerate(choices)],
            "usage": use}


def chunk(chat: bool, rid: str, created: int, model: str, index: int, text: str | None,
          finish_reason: str | None, first: bool = False, with_usage: bool = False,
          logprobs: list | dict | None = None) -> dict:
    """One streamed piece of choice `index` (chat.completion.chunk or text_completion); logprobs:
    those of the tokens this piece covers (chat: the `content` list; completions: the legacy object)."""
    if chat:
        delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": finish_reason}
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if with_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last one when include_usage is set
    return out


def usage_chunk(chat: bool, rid: str, created: int, model: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": use}
