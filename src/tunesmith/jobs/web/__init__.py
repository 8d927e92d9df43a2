"""The dashboard: one static page (index.html + app.js + style.css, no build step) over the /v1 jobs
API, plus the few /ui routes the API does not have.

    GET  /                                  the page (the login form first when a key is set)
    GET  /ui/static/{index.html|app.js|job.js|style.css}
    POST /ui/login {key} | /ui/logout       session cookies (auth.py)
    GET  /ui/api/schema                     the new-job form's fields (schema.py)
    GET  /ui/api/jobs/{id}/stream           the job's events as server-sent events, oldest first
    GET  /ui/api/jobs/{id}/log?tail=N       the last N lines of its training log
    POST /ui/api/jobs/{id}/export {format, quant} | /compare   a `tunesmith export|compare` task
    GET  /ui/api/jobs/{id}/tasks            those tasks, with their output files
    GET  /ui/api/jobs/{id}/tasks/{task}/files/{name}   one output file (a download)
    GET  /ui/api/jobs/{id}/compare | /ui/jobs/{id}/report   the latest comparison (JSON | its HTML)

Every path is built from ids this service made (layout.py); a file name in a request is only
looked up among the files a task folder holds, never joined onto a path.
"""
from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from tunesmith.jobs.context import JobsContext
from tunesmith.jobs.store import TERMINAL
from tunesmith.jobs.web import auth as a
from tunesmith.jobs.web.schema import export_choices, form_schema
from tunesmith.serve import protocol as p

STATIC = a.STATIC_FILES
POLL_S = 0.5              # how often a stream looks for new events
KEEPALIVE_S = 15.0        # an SSE comment this often, so proxies keep an idle stream open
STREAM_BATCH = 500
MAX_TAIL = 5000           # log lines one request may ask for
TAIL_READ_BYTES = 4 << 20  # the most of a log read to find them
MAX_LISTED = 1000         # files listed per task folder
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# compare.html is self-contained: inline style, plots as data: PNGs, no script at all.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'"


def static_text(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def guard_options(ctx: JobsContext) -> dict:
    """Keyword arguments for serve.checks.Guard: the login session and the paths open without it."""
    return {"session": a.session_check(ctx.api_key), "open_paths": a.OPEN_PATHS}


def event_object(row: dict) -> dict:
    """The API's event object (jobs/api.py) plus its sequence number (the stream's resume point)."""
    from tunesmith.jobs.api import event_object as api_event

    return {**api_event(row), "seq": row["seq"]}


def tail_lines(path: Path, n: int) -> list[str]:
    """The last n lines of a text file, reading at most TAIL_READ_BYTES from its end."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - TAIL_READ_BYTES))
        data = fh.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > TAIL_READ_BYTES and lines:
        lines = lines[1:]  # the first line read may be cut
    return lines[-n:] if n else []


class _Web:
    def __init__(self, ctx: JobsContext):
        self.ctx, self._auth = ctx, a.Auth(None)

    @property
    def auth(self) -> a.Auth:
        """Made from ctx.api_key when asked: serve sets the key after the routes are added."""
        if self._auth.key != (self.ctx.api_key.encode() if self.ctx.api_key else None):
            self._auth = a.Auth(self.ctx.api_key)
        return self._auth

    # -- lookups (404 for anything that is not a job of this store)
    def job(self, job_id: str) -> dict:
        try:
            self.ctx.layout.job_dir(job_id)
        except ValueError:
            raise p.APIError(404, f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id",
                             code="not_found") from None
        job = self.ctx.store.job(job_id)
        if job is None:
            raise p.APIError(404, f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="not_found")
        return job

    def out_dir(self, job_id: str, task: dict) -> Path:
        """A task's output folder: the --out of the argv this module submitted, when it lies in the
        job's tasks folder; else the folder named by the task id."""
        tasks_root = self.ctx.layout.job_dir(job_id) / "tasks"
        args = task.get("args")
        argv = args.get("argv") if isinstance(args, dict) else args
        if isinstance(args, dict) and args.get("out_dir"):
            candidate = Path(args["out_dir"])
        elif isinstance(argv, list) and "--out" in argv[:-1]:
            candidate = Path(argv[argv.index("--out") + 1])
        else:
            candidate = None
        if candidate is not None and candidate.resolve().parent == tasks_root.resolve():
            return candidate
        return self.ctx.layout.task_dir(job_id, task["id"])

    def listing(self, folder: Path) -> dict[str, Path]:
        """name (relative, '/'-separated) -> path of every file under folder, hidden ones (staging
        folders of an export in progress) left out."""
        if not folder.is_dir():
            return {}
        out = {}
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not path.is_symlink() and not any(part.startswith(".") for part in rel.parts):
                out[rel.as_posix()] = path
                if len(out) >= MAX_LISTED:
                    break
        return out

    def task_view(self, job_id: str, task: dict) -> dict:
        files = self.listing(self.out_dir(job_id, task)) if task["status"] == "succeeded" else {}
        return {"id": task["id"], "kind": task["kind"], "status": task["status"], "created_at": task["created_at"],
                "finished_at": task.get("finished_at"), "error": task.get("error"),
                "files": [{"name": n, "bytes": f.stat().st_size,
                           "url": f"/ui/api/jobs/{job_id}/tasks/{task['id']}/files/{n}"} for n, f in files.items()]}

    def latest_compare(self, job_id: str, name: str) -> Path:
        for task in reversed(self.ctx.store.tasks(job_id)):
            if task["kind"] == "compare" and task["status"] == "succeeded":
                path = self.out_dir(job_id, task) / name
                if path.is_file():
                    return path
        raise p.APIError(404, f"job {job_id} has no finished comparison yet: POST /ui/api/jobs/{job_id}/compare",
                         code="not_found")

    def submit(self, job_id: str, kind: str, argv_tail: list[str]) -> dict:
        from tunesmith.jobs.layout import new_id

        job = self.job(job_id)
        if job["status"] != "succeeded":
            raise p.APIError(409, f"job {job_id} is {job['status']}: {kind} needs a succeeded job",
                             code="job_not_ready")
        if self.ctx.runner is None:
            raise p.APIError(503, "this server has no job runner", type="server_error", code="unavailable")
        task_id = new_id("task")
        out_dir = self.ctx.layout.task_dir(job_id, task_id)
        run_dir = str(self.ctx.layout.run_dir(job_id))
        argv = [kind, run_dir, *argv_tail, "--out", str(out_dir)]
        task = self.ctx.runner.submit_task(job_id, kind, argv, out_dir, task_id=task_id)
        return self.task_view(job_id, task)

    # -- the live stream
    async def stream(self, request: Request, job_id: str):
        self.job(job_id)
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        seq = int(after) if after.isdigit() else 0
        store = self.ctx.store

        async def events():
            nonlocal seq
            quiet = 0.0
            while True:
                # status first: events written before a terminal status are then in this read
                status = (await run_in_threadpool(store.job, job_id))["status"]
                rows = await run_in_threadpool(store.events_since, job_id, seq, STREAM_BATCH)
                for row in rows:
                    seq = row["seq"]
                    yield f"id: {seq}\ndata: {json.dumps(event_object(row))}\n\n"
                if len(rows) == STREAM_BATCH:
                    continue
                if status in TERMINAL:
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                if rows:
                    quiet = 0.0
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_S)
                quiet += POLL_S

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_csrf(web: _Web, request: Request) -> None:
    """With no API key the Guard checks nothing: a changing /ui request must still carry the
    X-CSRF-Token header, which no cross-site form or simple request can (auth.py)."""
    if not web.auth.enabled and a.CSRF_HEADER not in request.headers:
        raise p.APIError(403, "missing X-CSRF-Token header (send any value; the dashboard does)", code="csrf")


async def _json_object(request: Request) -> dict:
    from tunesmith.serve.checks import json_body

    body = await json_body(request, 64 << 10)
    if not isinstance(body, dict):
        raise p.APIError(400, "the request body must be a JSON object")
    return body


def routes(app, ctx: JobsContext) -> None:
    web = _Web(ctx)

    def page(name: str) -> Response:
        return Response(static_text(name), media_type=STATIC[name],
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        if web.auth.enabled and not web.auth.logged_in(request):
            return HTMLResponse(a.login_page(), headers={"Content-Security-Policy": PAGE_CSP})
        return page("index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it on every page: no icon, and no 401 in the log
        return Response(status_code=204)

    @app.get(a.STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise p.APIError(404, f"no such file: {name}", code="not_found")
        return page(name)

    @app.post(a.LOGIN_PATH, include_in_schema=False)
    async def login(request: Request):
        form = request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
        if form:
            from urllib.parse import parse_qs

            raw = await request.body()
            typed = parse_qs(raw.decode("utf-8", "replace")).get("key", [""])[0] if len(raw) < 8192 else ""
        else:
            typed = str((await _json_object(request)).get("key", ""))
        if not web.auth.enabled:
            return RedirectResponse("/", status_code=303) if form else JSONResponse({"ok": True})
        if not web.auth.key_matches(typed):
            await asyncio.sleep(0.5)  # slows guessing
            if form:
                return HTMLResponse(a.login_page("That is not this server's API key."), status_code=401,
                                    headers={"Content-Security-Policy": PAGE_CSP})
            raise p.APIError(401, "wrong API key", type="authentication_error", code="invalid_api_key")
        session, csrf = web.auth.new_session()
        response = RedirectResponse("/", status_code=303) if form else JSONResponse({"ok": True})
        a.set_session_cookies(response, session, csrf, secure=request.url.scheme == "https", ttl_s=web.auth.ttl_s)
        return response

    @app.post(a.LOGOUT_PATH, include_in_schema=False)
    async def logout():
        response = RedirectResponse("/", status_code=303)
        a.clear_session_cookies(response)
        return response

    @app.get("/ui/api/schema")
    async def schema():
        return await run_in_threadpool(form_schema, ctx.base_name)

    @app.get("/ui/api/jobs/{job_id}/stream")
    async def stream(job_id: str, request: Request):
        return await web.stream(request, job_id)

    @app.get("/ui/api/jobs/{job_id}/log")
    async def log(job_id: str, tail: int = 200):
        web.job(job_id)
        if not 0 <= tail <= MAX_TAIL:
            raise p.APIError(400, f"tail must be between 0 and {MAX_TAIL} (got {tail})", param="tail")
        path = ctx.layout.log_path(job_id)
        lines = await run_in_threadpool(tail_lines, path, tail) if path.is_file() else []
        return {"object": "list", "data": lines, "exists": path.is_file()}

    @app.post("/ui/api/jobs/{job_id}/export")
    async def export(job_id: str, request: Request):
        _check_csrf(web, request)
        body = await _json_object(request)
        formats = export_choices()
        fmt, quant = body.get("format"), body.get("quant", "q8_0")
        if fmt not in formats["formats"]:
            raise p.APIError(400, f"format must be one of {', '.join(formats['formats'])} (got {fmt!r})",
                             param="format")
        tail = ["--format", fmt, "--force"]  # --force: the fresh task folder may already be made by the runner
        if fmt == "gguf":
            quants = [q.strip() for q in str(quant).split(",") if q.strip()]
            bad = [q for q in quants if q not in formats["gguf_quants"]]
            if not quants or bad:
                raise p.APIError(400, f"quant must be one or more of {', '.join(formats['gguf_quants'])} "
                                 f"(got {quant!r})", param="quant")
            tail += ["--quant", ",".join(quants)]
        return await run_in_threadpool(web.submit, job_id, "export", tail)

    @app.post("/ui/api/jobs/{job_id}/compare")
    async def compare(job_id: str, request: Request):
        _check_csrf(web, request)
        job = web.job(job_id)
        name, file_id = (("validation", job["validation_file"]) if job.get("validation_file")
                         else ("training", job["training_file"]))
        data = ctx.layout.file_path(file_id)
        return await run_in_threadpool(web.submit, job_id, "compare", ["--task", f"{name}=perplexity:{data}"])

    @app.get("/ui/api/jobs/{job_id}/tasks")
    async def tasks(job_id: str):
        web.job(job_id)
        rows = await run_in_threadpool(ctx.store.tasks, job_id)
        return {"object": "list", "data": [web.task_view(job_id, t) for t in rows]}

    @app.get("/ui/api/jobs/{job_id}/tasks/{task_id}/files/{name:path}")
    async def task_file(job_id: str, task_id: str, name: str):
        web.job(job_id)
        task = ctx.store.task(task_id)
        if task is None or task["job_id"] != job_id:
            raise p.APIError(404, f"job {job_id} has no task {task_id!r}", code="not_found")
        found = web.listing(web.out_dir(job_id, task)).get(name) if task["status"] == "succeeded" else None
        if found is None:
            raise p.APIError(404, f"task {task_id} has no file {name!r}", code="not_found")
        return FileResponse(found, filename=found.name, media_type="application/octet-stream")

    @app.get("/ui/api/jobs/{job_id}/compare")
    async def compare_json(job_id: str):
        web.job(job_id)
        path = web.latest_compare(job_id, "compare.json")
        return JSONResponse(json.loads(path.read_text(encoding="utf-8")))

    @app.get("/ui/jobs/{job_id}/report", include_in_schema=False)
    async def report(job_id: str):
        web.job(job_id)
        path = web.latest_compare(job_id, "compare.html")
        return HTMLResponse(path.read_text(encoding="utf-8"),
                            headers={"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"})
