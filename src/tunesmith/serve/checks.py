"""What every request must pass before it reaches the engine: the bearer key, the body size
(declared and actual), JSON, a known model, a prompt the model's template and tokenizer accept,
and the token limits."""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.requests import ClientDisconnect

from tunesmith.errors import ModelError
from tunesmith.serve import protocol as p

OPEN_PATHS = {"/health"}  # answered without the API key


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20        # request body, bytes
    max_prompt_tokens: int = 4096        # rendered prompt, tokens
    max_tokens_limit: int = 2048         # the largest max_tokens a request may ask for
    default_max_tokens: int = 256        # chat requests without max_tokens (completions: OpenAI's 16)
    max_n: int = 8                       # choices per request
    max_in_flight: int = 256             # generations running or queued; more get 429
    context_length: int | None = None    # prompt + max_tokens must fit (the model's positions)


# ------------------------------------------------------------------------- guard middleware

async def send_error(send, err: p.APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Pure ASGI middleware, so it runs before routing and before the body is read: the bearer
    key (compared in constant time) and a declared Content-Length over the body limit.

    body_limits: a larger limit for paths under a prefix (uploads: {"/v1/files": bytes}).
    session: another way in besides the bearer key (the dashboard's login cookie): called with
    the scope and its headers, True lets the request through. open_paths: more paths answered
    without a key (the dashboard's login page)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_limits: dict[str, int] | None = None,
                 session=None, open_paths: set[str] = frozenset()):
        self.app, self.max_body = app, max_body_bytes
        self.open_paths = OPEN_PATHS | set(open_paths)
        self.key = api_key.encode() if api_key else None
        self.body_limits, self.session = dict(body_limits or {}), session

    def limit_for(self, path: str) -> int:
        return next((n for prefix, n in self.body_limits.items() if path == prefix or path.startswith(prefix + "/")),
                    self.max_body)

    def _authorized(self, scope, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return True
        return self.session is not None and not auth and bool(self.session(scope, headers))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if _cross_origin_write(scope, headers):
            return await send_error(send, p.APIError(
                403, "cross-origin request refused: a page of another site may not send this server requests that "
                "change anything (call it from a client, or from pages this server serves)",
                type="permission_error", code="cross_origin"))
        if self.key is not None and scope.get("path") not in self.open_paths and not self._authorized(scope, headers):
            what = "missing" if not headers.get(b"authorization") else "incorrect"
            return await send_error(send, p.APIError(
                401, f"{what} API key: send the header 'Authorization: Bearer <key>' with the key the server "
                "was started with", type="authentication_error", code="invalid_api_key"))
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await send_error(send, p.APIError(400, "invalid Content-Length header"))
            limit = self.limit_for(scope.get("path", ""))
            if int(length) > limit:
                return await send_error(send, too_large(limit))
        return await self.app(scope, receive, send)


SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _cross_origin_write(scope, headers: dict) -> bool:
    """A browser sends Origin with every cross-site POST, including the 'simple' ones (a form, a
    multipart upload) that no CORS preflight stops; a key-less server on loopback would otherwise
    take them from any page the user visits. API clients send no Origin and are not affected."""
    origin = headers.get(b"origin")
    if origin is None or scope.get("method", "GET") in SAFE_METHODS:
        return False
    from urllib.parse import urlsplit

    netloc = urlsplit(origin.decode("latin-1")).netloc
    return not netloc or netloc.encode("latin-1").lower() != headers.get(b"host", b"").lower()


def too_large(limit: int) -> p.APIError:
    return p.APIError(413, f"request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                      code="request_too_large")


# ---------------------------------------------------------------------------- body, prompts

def no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def json_body(request, limit: int):
    """The body parsed as JSON, read in chunks so a body without (or lying about) Content-Length
    is cut off at the limit before anything is parsed."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise p.APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                         f"(got {ctype or 'no content type'!r})", code="unsupported_media_type")
    size, parts = 0, []
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large(limit)
            parts.append(part)
    except ClientDisconnect:
        raise p.APIError(400, "the client disconnected while sending the body") from None
    if not size:
        raise p.APIError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(b"".join(parts), parse_constant=no_constants)
    except RecursionError:
        raise p.APIError(400, "the request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise p.APIError(400, f"the request body is not valid JSON: {exc}") from None


def check_model(engine, name: str) -> None:
    names = engine.models()
    if name not in names:
        raise p.APIError(404, f"The model {name!r} does not exist; available models: {', '.join(names)}",
                         param="model", code="model_not_found")


def tokenizer(engine, name: str):
    check_model(engine, name)
    try:
        return engine.tokenizer_for(name)
    except ModelError as exc:  # listed but cannot be used (a broken adapter folder)
        raise p.APIError(400, str(exc), param="model", code="model_unavailable") from None


def chat_ids(tokenizer, model: str, conversation: list[dict]) -> list[int]:
    from tunesmith.data.tokenize import prompt_ids

    try:
        return prompt_ids(tokenizer, conversation)
    except Exception as exc:  # jinja2 TemplateError from a template's own raise_exception, odd text
        raise p.APIError(400, f"the chat template of model {model!r} cannot render these messages: {exc}",
                         param="messages", code="invalid_messages") from None


def completion_ids(tokenizer, prompts: list) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            try:  # the tokenizer's own special tokens (a BOS) as for any raw-text prompt
                out.append(tokenizer(prompt)["input_ids"])
            except Exception as exc:
                raise p.APIError(400, f"prompt[{i}] cannot be tokenized: {exc}", param="prompt") from None
        else:
            bad = next((t for t in prompt if not 0 <= t < len(tokenizer)), None)
            if bad is not None:
                raise p.APIError(400, f"prompt[{i}] holds token id {bad}, outside the vocabulary "
                                 f"(0..{len(tokenizer) - 1})", param="prompt")
            out.append(list(prompt))
    return out


def max_tokens(req, limits: Limits, default: int, prompts: list[list[int]]) -> int:
    """The request's max_tokens; without one, `default` shortened to what the context has room
    for (as OpenAI does), so only an explicit max_tokens can overflow the context."""
    asked = req.requested_tokens
    if asked is not None and asked > limits.max_tokens_limit:
        raise p.APIError(400, f"max_tokens is {asked}, over this server's limit of {limits.max_tokens_limit} "
                         "(--max-tokens-limit)", param="max_tokens", code="max_tokens_too_large")
    if asked is not None:
        return asked
    room = limits.context_length - max(map(len, prompts)) if limits.context_length else default
    return max(1, min(default, limits.max_tokens_limit, room))  # no room at all: check_prompts says so


def check_prompts(prompts: list[list[int]], max_tokens: int, limits: Limits, param: str) -> None:
    for ids in prompts:
        if not ids:
            raise p.APIError(400, f"{param} is empty: there is nothing to continue", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise p.APIError(400, f"the prompt is {len(ids)} tokens long, over this server's limit of "
                             f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param=param,
                             code="context_length_exceeded")
        if limits.context_length and len(ids) + max_tokens > limits.context_length:
            raise p.APIError(400, f"this model's maximum context length is {limits.context_length} tokens, but "
                             f"{len(ids) + max_tokens} were requested ({len(ids)} in the prompt, {max_tokens} in "
                             "max_tokens); shorten the prompt or lower max_tokens", param=param,
                             code="context_length_exceeded")
