"""`tunesmith serve`: an OpenAI-compatible HTTP server over the batching engine.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(both with `stream: true` as server-sent events, and token log-probabilities on request:
serve/logprobs.py), GET /v1/adapters (which are in memory),
POST /v1/adapters/{name}/load|unload, GET /health.
Chat prompts are rendered with the requested model's own chat template (an adapter trained in a
run directory keeps the template it was trained with). Adapters also load lazily on their first
request; the admin endpoints only make that explicit (or free the memory). Names come from the
engine's adapter directory, never a path from a request.

Every failure is OpenAI-style error JSON: 401 bad/missing bearer key, 404 unknown model or route,
405 wrong method, 413 body over the limit (Content-Length and the bytes actually read, before any
JSON parsing), 415 not JSON, 400 invalid fields / prompt too long / max_tokens over the limit,
429 too many generations in flight. Only a fault of the server itself is a 500.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request  # at module level: FastAPI resolves the route annotations here
from starlette.responses import JSONResponse, StreamingResponse

from tunesmith.errors import ConfigError, DataError, ModelError, TunesmithError
from tunesmith.serve import checks as c
from tunesmith.serve import logprobs as lp
from tunesmith.serve import protocol as p
from tunesmith.serve.adapters import NAME_RE  # the engine checks names again when it loads
from tunesmith.serve.checks import Limits
from tunesmith.serve.engine import Engine, GenRequest, off_main_thread
from tunesmith.serve.prefix_cache import DEFAULT_MB, check_budget

log = logging.getLogger("tunesmith.serve")

# ------------------------------------------------------------------------ waiting on the engine

async def _disconnected(request) -> None:
    """Returns when the client goes away (the body has been read, so receive() only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _pump(handle, index: int, queue: asyncio.Queue) -> None:
    async for delta in handle.astream():
        queue.put_nowait((index, delta))


def _engine_error(exc: BaseException | None, rid: str) -> p.APIError:
    """A generation that failed after it was accepted: a broken adapter is the request's problem
    (400); a server shutting down is 503; anything else is a fault of the server (500)."""
    if isinstance(exc, ModelError):
        return p.APIError(400, str(exc), param="model", code="model_unavailable")
    if isinstance(exc, TunesmithError):
        return p.APIError(503, str(exc), type="server_error", code="unavailable")
    log.error("generation of %s failed: %r", rid, exc, exc_info=exc)
    return p.APIError(500, f"generation failed ({type(exc).__name__ if exc else 'cancelled'}); see the server log",
                      type="server_error")


async def _results(request, handles, tasks) -> list:
    """Every handle's Completion; the handles are cancelled if the client goes away first."""
    gathered = asyncio.gather(*tasks)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            raise p.APIError(499, "client closed the request")  # nobody is left to read this
        if gathered.exception() is not None:
            raise _engine_error(gathered.exception(), "request") from None
        return gathered.result()
    finally:
        gone.cancel()
        for h, task in zip(handles, tasks):  # the client left, or a sibling choice failed
            if not task.done():
                h.cancel()
        if not gathered.done():
            gathered.cancel()


class _Service:
    """The request handling behind the routes: validate, render, submit, answer or stream."""

    def __init__(self, engine, limits: Limits):
        self.engine, self.limits, self.in_flight = engine, limits, 0

    # -- entry points
    async def chat(self, request):
        req = p.parse_request(p.ChatCompletionRequest, await c.json_body(request, self.limits.max_body_bytes))
        self._check_n(req)
        tok = await run_in_threadpool(c.tokenizer, self.engine, req.model)
        ids = await run_in_threadpool(c.chat_ids, tok, req.model, req.conversation())
        max_tokens = c.max_tokens(req, self.limits, self.limits.default_max_tokens, [ids])
        c.check_prompts([ids], max_tokens, self.limits, "messages")
        return await self._run(request, req, [ids], max_tokens, chat=True, tok=tok)

    async def completions(self, request):
        req = p.parse_request(p.CompletionRequest, await c.json_body(request, self.limits.max_body_bytes))
        self._check_n(req, prompts=len(req.prompts()))
        tok = await run_in_threadpool(c.tokenizer, self.engine, req.model)
        prompts = await run_in_threadpool(c.completion_ids, tok, req.prompts())
        max_tokens = c.max_tokens(req, self.limits, 16, prompts)
        c.check_prompts(prompts, max_tokens, self.limits, "prompt")
        texts = [x if isinstance(x, str) else None for x in req.prompts()]  # token-id prompts: decoded
        return await self._run(request, req, prompts, max_tokens, chat=False, tok=tok, texts=texts)

    def _check_n(self, req, prompts: int = 1) -> None:
        if req.n > self.limits.max_n:
            raise p.APIError(400, f"n is {req.n}, over this server's limit of {self.limits.max_n}", param="n")
        if prompts == 0:
            raise p.APIError(400, "prompt is an empty list", param="prompt")
        if prompts * req.n > self.limits.max_n:
            raise p.APIError(400, f"{prompts} prompts x n={req.n} is {prompts * req.n} generations, over this "
                             f"server's limit of {self.limits.max_n} per request", param="prompt")

    # -- submission
    def _submit(self, req, prompts: list[list[int]], max_tokens: int) -> list:
        wanted = len(prompts) * req.n
        if self.in_flight + wanted > self.limits.max_in_flight:
            raise p.APIError(429, f"the server is busy ({self.in_flight} generations in flight, limit "
                             f"{self.limits.max_in_flight}); retry shortly", type="rate_limit_error",
                             code="server_busy")
        handles = []
        try:
            for ids in prompts:
                for j in range(req.n):
                    handles.append(self.engine.submit(GenRequest(
                        prompt_ids=ids, model=req.model, max_tokens=max_tokens, temperature=req.temperature,
                        top_p=req.top_p, stop=req.stops, seed=req.choice_seed(j), logprobs=req.top,
                        prompt_logprobs=bool(getattr(req, "echo", False)) and req.top is not None)))
        except BaseException as exc:
            for h in handles:
                h.cancel()
            if isinstance(exc, DataError):  # the engine's own checks (prompt vs context ...)
                raise p.APIError(400, str(exc)) from None
            if isinstance(exc, TunesmithError):
                raise _engine_error(exc, "request") from None
            raise
        return handles

    def _track(self, tasks: list) -> None:
        # in-flight counts each generation until its reader task ends, however the request ends
        self.in_flight += len(tasks)
        for task in tasks:
            task.add_done_callback(self._one_done)

    def _one_done(self, _task) -> None:
        self.in_flight -= 1

    async def _run(self, request, req, prompts, max_tokens, chat: bool, tok, texts=None):
        handles = self._submit(req, prompts, max_tokens)
        text_of = lp.TokenText(tok) if req.top is not None else None
        meta = (p.new_id("chatcmpl" if chat else "cmpl"), p.now(), req.model)
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            queue: asyncio.Queue = asyncio.Queue()
            pumps = [asyncio.ensure_future(_pump(h, i, queue)) for i, h in enumerate(handles)]
            for i, task in enumerate(pumps):  # queued after the pump's last delta
                task.add_done_callback(lambda t, i=i: queue.put_nowait((i, t)))
            self._track(pumps)
            events = self._stream(handles, queue, meta, chat, req.include_usage, prompt_tokens, text_of,
                                  [self._prompt_text(tok, ids, texts, i) for i, ids in enumerate(prompts)
                                   for _ in range(req.n)] if not chat else None, echo=getattr(req, "echo", False))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        tasks = [asyncio.ensure_future(h.aresult()) for h in handles]
        self._track(tasks)
        results = await _results(request, handles, tasks)
        if chat:
            choices = [(r.text, r.finish_reason, lp.chat_content(text_of, r.logprobs or []) if text_of else None)
                       for r in results]
        else:
            choices = [self._text_choice(req, r, self._prompt_text(tok, prompts[k // req.n], texts, k // req.n),
                                         text_of) for k, r in enumerate(results)]
        # prompt tokens are counted once per prompt, however many choices share it (as OpenAI does)
        use = p.usage(prompt_tokens, sum(r.completion_tokens for r in results))
        build = p.chat_completion if chat else p.text_completion
        return JSONResponse(build(*meta, choices, use))

    @staticmethod
    def _prompt_text(tok, ids: list[int], texts: list | None, i: int) -> str:
        if texts and texts[i] is not None:
            return texts[i]
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @staticmethod
    def _text_choice(req, result, prompt_text: str, text_of) -> tuple:
        """(text, finish_reason, logprobs) of a completion: with echo the prompt comes first, in the
        text and in the logprobs (its first token's logprob is null: nothing predicts it)."""
        text = prompt_text + result.text if req.echo else result.text
        if text_of is None:
            return text, result.finish_reason, None
        entries = (result.prompt_logprobs or []) + (result.logprobs or []) if req.echo else result.logprobs or []
        return text, result.finish_reason, lp.legacy(text_of, entries, 0 if req.echo else len(prompt_text))

    async def _stream(self, handles, queue, meta, chat: bool, include_usage: bool, prompt_tokens: int,
                      text_of=None, prompt_texts: list[str] | None = None, echo: bool = False):
        """SSE events: a role chunk per choice (chat), with echo a chunk of the prompt per choice
        (and its logprobs), text deltas as they come, a final chunk per choice with its finish_reason,
        the usage chunk when asked, then [DONE]. The request's handles are cancelled if the client
        goes away (Starlette cancels this generator)."""
        finished: set[int] = set()
        offsets: dict[int, int] = {}  # completions: each choice's next text_offset

        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            if chat:
                for i in range(len(handles)):
                    yield event(p.chunk(True, *meta, i, None, None, first=True, with_usage=include_usage))
            ended = 0
            while ended < len(handles):
                i, item = await queue.get()
                if isinstance(item, asyncio.Future):  # a pump ended: normally after its final delta
                    ended += 1
                    if item.cancelled() or item.exception() is not None or i not in finished:
                        err = _engine_error(None if item.cancelled() else item.exception(), meta[0])
                        yield event(err.body())  # the status line has gone out: the error is an event
                        return
                    continue
                if echo and i not in offsets:  # the choice's first delta: its prompt goes out first
                    prompt_lp = None
                    if text_of is not None and item.prompt_logprobs:
                        prompt_lp = lp.legacy(text_of, item.prompt_logprobs, 0)
                    offsets[i] = lp.next_offset(prompt_lp) if prompt_lp else len(prompt_texts[i])
                    yield event(p.chunk(False, *meta, i, prompt_texts[i], None, with_usage=include_usage,
                                        logprobs=prompt_lp))
                    if item.prompt_logprobs:
                        continue
                # text and finish_reason in separate chunks, as OpenAI sends them (the last delta is empty)
                logprobs = None
                if text_of is not None and item.logprobs:
                    if chat:
                        logprobs = lp.chat_content(text_of, item.logprobs)
                    else:
                        logprobs = lp.legacy(text_of, item.logprobs, offsets.get(i, len(prompt_texts[i])))
                        offsets[i] = lp.next_offset(logprobs)
                if item.text or logprobs:
                    yield event(p.chunk(chat, *meta, i, item.text, None, with_usage=include_usage,
                                        logprobs=logprobs))
                if item.finish_reason:
                    yield event(p.chunk(chat, *meta, i, None, item.finish_reason, with_usage=include_usage))
                    finished.add(i)
            if include_usage:
                results = [await h.aresult() for h in handles]
                use = p.usage(prompt_tokens, sum(r.completion_tokens for r in results))
                yield event(p.usage_chunk(chat, *meta, use))
            yield "data: [DONE]\n\n"
        finally:
            for i, h in enumerate(handles):
                if i not in finished:
                    h.cancel()

    # -- admin
    async def adapter(self, name: str, action: str):
        if not NAME_RE.match(name):
            raise p.APIError(400, f"invalid adapter name {name!r}: letters, digits, '.', '_' and '-' only",
                             param="name")
        c.check_model(self.engine, name)
        try:
            await run_in_threadpool(getattr(self.engine, f"{action}_adapter"), name)
        except ModelError as exc:
            raise p.APIError(400, str(exc), param="name", code="model_unavailable") from None
        return {"id": name, "object": "adapter", "status": "loaded" if action == "load" else "unloaded"}


# ------------------------------------------------------------------------------- the app

def _error_response(err: p.APIError):
    headers = {"www-authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def api_error(request, exc: p.APIError):
        return _error_response(exc)

    async def http_error(request, exc: HTTPException):  # routing: 404 unknown path, 405 wrong method
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error_response(p.APIError(exc.status_code, str(what), code="not_found" if exc.status_code == 404
                                          else None))

    async def validation_error(request, exc: RequestValidationError):
        return _error_response(p.APIError(400, f"invalid request: {exc.errors()[0].get('msg', exc)}"))

    async def server_error(request, exc: Exception):  # a bug or an engine fault, never a bad request
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(p.APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                                          type="server_error"))

    app.add_exception_handler(p.APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def build_app(engine, api_key: str | None = None, limits: Limits | None = None, guard: dict | None = None):
    """The FastAPI app over a (started) engine. api_key: when set, every endpoint but /health
    needs 'Authorization: Bearer <api_key>'. guard: more of checks.Guard's options (an add-on's
    upload limits, its login session, its open paths)."""
    from fastapi import FastAPI

    limits = limits or Limits()
    service = _Service(engine, limits)
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    created = p.now()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [p.model_card(m, created) for m in engine.models()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        c.check_model(engine, model)
        return p.model_card(model, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await service.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.completions(request)

    @app.get("/v1/adapters")
    async def adapters():
        return {"object": "list", "data": [{"id": m, "object": "adapter", "loaded": engine.is_loaded(m)}
                                           for m in engine.models()[1:]]}

    @app.post("/v1/adapters/{name}/load")
    async def load(name: str):
        return await service.adapter(name, "load")

    @app.post("/v1/adapters/{name}/unload")
    async def unload(name: str):
        return await service.adapter(name, "unload")

    app.add_middleware(c.Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, **(guard or {}))
    app.state.service = service
    return app


# ------------------------------------------------------------------------------- serve

def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_name(run_manifest: dict) -> str:
    base_id = str(run_manifest["model"]["id"])
    return Path(base_id).name if Path(base_id).is_absolute() or base_id.startswith(".") else base_id


def _run_as_adapter(run: Path, into: Path) -> None:
    """A copy of a run's adapter, tokenizer and manifest as `into/<run name>`: the engine serves
    adapters from one directory it owns, and the run directory itself stays untouched."""
    import shutil

    if not NAME_RE.match(run.name):
        raise ConfigError(f"run directory name {run.name!r} cannot be a model name (letters, digits, '.', '_', '-'); "
                          "rename the folder")
    dest = into / run.name
    dest.mkdir()
    shutil.copy2(run / "manifest.json", dest / "manifest.json")
    for sub in ("adapter", "tokenizer"):
        if (run / sub).is_dir():
            shutil.copytree(run / sub, dest / sub)


def served_name(model_spec: str | Path) -> str:
    """The model name a base (not a run directory) is served under."""
    spec = Path(model_spec)
    return spec.stem if spec.suffix == ".gguf" else spec.name if spec.is_dir() else str(model_spec)


def load_engine(model_spec: str | Path, adapters_dir: str | Path | None, max_batch: int, scratch: Path,
                prefix_cache_mb: float = DEFAULT_MB):
    """The engine for `serve`: a model spec is the base (named after it) plus the adapters in
    adapters_dir. A run directory with an adapter serves its base model plain and the run as an
    adapter under the run's name, alongside the other runs when adapters_dir is the folder that
    holds it. A full fine-tune run is served whole, under the run's name."""
    from tunesmith.generation import is_run_dir, load_for_inference

    spec = Path(model_spec)
    if is_run_dir(spec) and (spec / "adapter" / "adapter_config.json").is_file():
        if adapters_dir is not None and spec.resolve().parent != Path(adapters_dir).resolve():
            raise ConfigError(f"{spec} is a run directory outside --adapters {adapters_dir}: put the run inside the "
                              "adapters directory, or pass its base model as MODEL")
        im = load_for_inference(spec, adapter=False)
        if adapters_dir is None:
            _run_as_adapter(spec, scratch)
            adapters_dir = scratch
        name = _base_name(json.loads((spec / "manifest.json").read_text()))
    else:
        im = load_for_inference(model_spec)
        name = served_name(model_spec)
    return Engine(im.model, im.tokenizer, name, adapters_dir=adapters_dir, max_batch=max_batch,
                  prefix_cache_mb=prefix_cache_mb)


def serve(model_spec: str | Path, adapters_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 32, max_body_bytes: int = Limits.max_body_bytes,
          max_prompt_tokens: int = Limits.max_prompt_tokens, max_tokens_limit: int = Limits.max_tokens_limit,
          log_level: str = "info", prefix_cache_mb: float = DEFAULT_MB, addon=None) -> None:
    """Serve a model (and the adapters in adapters_dir) over the OpenAI HTTP API until stopped
    (Ctrl-C). api_key falls back to $TUNESMITH_API_KEY (kept off the command line, where other
    users of the machine can read it). prefix_cache_mb: memory for the KV of prompt heads shared
    between requests (serve/prefix_cache.py; 0 turns it off).

    addon: more routes on the same app (the jobs service, jobs/service.py), duck-typed so that
    serve/ imports nothing above it: adapters(adapters_dir) -> what the engine takes as its
    adapter directory, guard(api_key) -> Guard options, install(app, engine), start(), close()."""
    import tempfile

    import uvicorn

    api_key = api_key or os.environ.get("TUNESMITH_API_KEY") or None
    for name, value in (("max_body_bytes", max_body_bytes), ("max_prompt_tokens", max_prompt_tokens),
                        ("max_tokens_limit", max_tokens_limit), ("max_batch", max_batch)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    check_budget(prefix_cache_mb)  # before the model loads
    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(pass --api-key or set TUNESMITH_API_KEY)", host)
    with tempfile.TemporaryDirectory(prefix="tunesmith-serve-") as scratch:
        adapters = addon.adapters(adapters_dir) if addon is not None else adapters_dir
        engine = off_main_thread(lambda: load_engine(model_spec, adapters, max_batch, Path(scratch),
                                                       prefix_cache_mb))
        limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                        max_tokens_limit=max_tokens_limit, default_max_tokens=min(256, max_tokens_limit),
                        context_length=engine.context)
        app = build_app(engine, api_key=api_key, limits=limits,
                        guard=addon.guard(api_key) if addon is not None else None)
        if addon is not None:
            addon.install(app, engine)
        engine.start()
        try:
            if addon is not None:
                addon.start()
            print(f"serving {', '.join(engine.models())} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
            uvicorn.run(app, host=host, port=port, log_level=log_level)
        finally:
            try:
                if addon is not None:
                    addon.close()
            finally:
                engine.close()
