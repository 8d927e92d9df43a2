"""The Files API (OpenAI's /v1/files shapes) and the audit every upload gets.

An upload is streamed to files/<id>.jsonl (jobs/upload.py: size limit while reading, UTF-8 and
JSON Lines checked before it is accepted) and answered at once with status `uploaded`. Its audit
is `tunesmith data inspect` in a subprocess (a client of the CLI, DESIGN.md); when it ends the
file is `processed` (the report stored, status_details its summary) or `error` (no row usable).
The runner waits on exactly that: store.file(id)["status"].

The client's filename is text shown back, never part of a path; every path is made from an id
this service generated, checked before use (layout.checked), so an unknown or ill-formed id in
any route is a 404.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request  # module level: FastAPI resolves the routes' string annotations here
from starlette.responses import FileResponse

from tunesmith.atomic import atomic_path
from tunesmith.jobs import upload
from tunesmith.jobs.context import JobsContext
from tunesmith.jobs.layout import checked, new_id
from tunesmith.jobs.store import JOB_STATUSES, TERMINAL
from tunesmith.serve import protocol as p

log = logging.getLogger("tunesmith.jobs.files")

PURPOSES = ("fine-tune",)
MAX_LIST = 10000            # OpenAI's largest `limit` for GET /v1/files, and its default
AUDIT_TIMEOUT_S = 3600      # an audit still running after this is killed and the file marked error
SHOWN_INVALID = 5           # invalid rows named in status_details (the audit lists them all)
ACTIVE = frozenset(JOB_STATUSES) - TERMINAL


def body_limits(ctx: JobsContext) -> dict[str, int]:
    """The serve Guard's per-path body limits the upload route needs."""
    return {"/v1/files": upload.body_limit(ctx.limits.max_upload_bytes)}


# ------------------------------------------------------------------------------ objects

def file_object(row: dict) -> dict:
    """A store row as OpenAI's FileObject."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


def get_file(ctx: JobsContext, file_id: str) -> dict:
    """The store row of a file, or a 404 for an ill-formed, unknown or deleted id."""
    try:
        checked(file_id, "file")
    except ValueError:
        row = None
    else:
        row = ctx.store.file(file_id)
    if row is None:
        raise p.APIError(404, f"No such File object: {file_id[:100]!r}", param="id", code="not_found")
    return row


# ------------------------------------------------------------------------------ upload

async def create_file(ctx: JobsContext, request) -> dict:
    """POST /v1/files: the upload stored under its new id, its audit started."""
    limits = ctx.limits
    if len(ctx.store.files(limit=limits.max_files)) >= limits.max_files:
        raise p.APIError(400, f"this server keeps at most {limits.max_files} files; delete some with "
                         "DELETE /v1/files/{id} first", code="too_many_files")
    file_id = new_id("file")
    dest = ctx.layout.file_path(file_id)
    # Written beside its final name and renamed only once accepted: a refused or cut-off upload
    # leaves nothing behind (atomic_path removes the temporary on any exception).
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            form = await upload.receive_form(request, out, limits.max_upload_bytes)
        purpose = _check_form(form)
        await run_in_threadpool(upload.check_jsonl, tmp)
    try:
        row = ctx.store.add_file(id=file_id, filename=form.filename, purpose=purpose, bytes=form.file_bytes,
                                 status="uploaded", status_details=None)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    auditor(ctx).submit(file_id)
    return file_object(row)


def _check_form(form: upload.Form) -> str:
    unknown = sorted(set(form.fields) - {"purpose"})
    if unknown:
        raise p.APIError(400, f"unknown form field {unknown[0]!r}; an upload has the fields 'file' and 'purpose'",
                         param=unknown[0])
    if form.filename is None:
        raise p.APIError(400, "no file in the form: send the data as the multipart field 'file'", param="file")
    purpose = form.fields.get("purpose")
    if purpose is None:
        raise p.APIError(400, "missing required parameter 'purpose' (this server accepts 'fine-tune')",
                         param="purpose")
    if purpose not in PURPOSES:
        raise p.APIError(400, f"purpose {purpose[:64]!r} is not accepted by this server: files are for fine-tuning "
                         f"jobs, so purpose must be {' or '.join(map(repr, PURPOSES))}", param="purpose")
    return purpose


# ------------------------------------------------------------------------------ list, delete

def list_files(ctx: JobsContext, query) -> dict:
    """GET /v1/files: OpenAI's cursor page (purpose, limit, after, order)."""
    limit = _int_param(query, "limit", MAX_LIST, 1, MAX_LIST)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise p.APIError(400, f"order must be 'asc' or 'desc' (got {order[:32]!r})", param="order")
    after = query.get("after")
    if after is not None:
        try:
            checked(after, "file")
        except ValueError:
            raise p.APIError(400, f"after must be a file id (file-...), got {after[:100]!r}", param="after") from None
    rows = ctx.store.files(purpose=query.get("purpose"), after=after, limit=limit + 1, newest_first=order == "desc")
    data = [file_object(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


def _int_param(query, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise p.APIError(400, f"{name} must be a whole number from {low} to {high} (got {raw[:32]!r})", param=name)
    return value


def delete_file(ctx: JobsContext, file_id: str) -> dict:
    """DELETE /v1/files/{id}: refused while a job that is not finished uses the file."""
    get_file(ctx, file_id)
    users = ctx.store.jobs_using(file_id, statuses=ACTIVE)
    if users:
        named = ", ".join(f"{j['id']} ({j['status']})" for j in users[:5])
        raise p.APIError(409, f"file {file_id} is used by job {named}; cancel the job or wait for it to finish, "
                         "then delete the file", param="id", code="file_in_use")
    ctx.store.delete_file(file_id)
    auditor(ctx).stop(file_id)
    ctx.layout.file_path(file_id).unlink(missing_ok=True)
    ctx.layout.audit_path(file_id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def audit_report(ctx: JobsContext, file_id: str) -> dict:
    """GET /v1/files/{id}/audit: the full `tunesmith data inspect` report, once processed."""
    row = get_file(ctx, file_id)
    if row["status"] == "uploaded":
        raise p.APIError(409, f"the audit of {file_id} is still running; its status turns 'processed' when it is done",
                         param="id", code="audit_pending")
    if row["status"] == "error" or row["audit"] is None:
        raise p.APIError(409, f"{file_id} has no audit report: {row['status_details']}", param="id",
                         code="audit_failed")
    return row["audit"]


# ------------------------------------------------------------------------------ audits

def audit_argv(ctx: JobsContext, file_id: str) -> list[str]:
    # The file is named relative to its folder (the subprocess's cwd) so no server path reaches
    # the report's row locations; --workers 1 leaves the other cores to training and serving.
    return [sys.executable, "-m", "tunesmith", "data", "inspect", ctx.layout.file_path(file_id).name,
            "--model", ctx.base_spec, "--skip-invalid", "--json", str(ctx.layout.audit_path(file_id)),
            "--workers", "1"]


def _lines_named(text: str, file_id: str) -> str:
    """'file-<id>.jsonl:3' (a row's location in the audit) -> 'line 3'; the bare name -> the id."""
    text = re.sub(rf"{re.escape(file_id)}\.jsonl:(\d+)", r"line \1", text)
    return text.replace(f"{file_id}.jsonl", file_id)


def _renamed(value, file_id: str):
    if isinstance(value, str):
        return _lines_named(value, file_id)
    if isinstance(value, list):
        return [_renamed(v, file_id) for v in value]
    if isinstance(value, dict):
        return {k: _renamed(v, file_id) for k, v in value.items()}
    return value


def _short(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def summary(report: dict) -> str:
    """status_details: the audit in a few sentences (rows, invalid lines, duplicates, PII)."""
    records = report["records"]
    kinds = ", ".join(f"{n} {fmt}" for fmt, n in records["by_format"].items())
    parts = [f"{records['total']} valid rows ({kinds})"]
    invalid = report["invalid"]
    if invalid:
        shown = "; ".join(f"{r['where']}: {_short(r['error'].removeprefix(r['where'] + ': '))}"
                          for r in invalid[:SHOWN_INVALID])
        more = f"; and {len(invalid) - SHOWN_INVALID} more" if len(invalid) > SHOWN_INVALID else ""
        parts.append(f"{len(invalid)} invalid rows, skipped in training: {shown}{more}")
    else:
        parts.append("no invalid rows")
    parts.append(f"{report['exact_duplicates']['rows']} exact duplicates, "
                 f"{report['near_duplicates']['rows']} near duplicates")
    pii = {k: v for k, v in report["pii"].items() if v}
    parts.append("PII: " + (", ".join(f"{n} {k}" for k, n in pii.items()) if pii else "none found"))
    tokens = report["tokens"]
    if tokens.get("truncated_rows"):
        parts.append(f"{tokens['truncated_rows']} rows longer than {tokens['max_length']} tokens")
    return ". ".join(parts) + "."


def _error_text(stderr: str, file_id: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "")
    error = re.sub(r" \(see [^)]*\)", "", error.removeprefix("error: "))  # the quarantine: none is kept
    return "the audit failed: " + _short(_lines_named(error, file_id), 600)


class Auditor:
    """The uploads' audit subprocesses, `concurrency` at a time, each watched by a thread that
    records the outcome in the store. An audit cut short by a shutdown leaves the file
    `uploaded`; resume() (called on start) audits it again."""

    def __init__(self, ctx: JobsContext, concurrency: int = 1, timeout_s: float = AUDIT_TIMEOUT_S):
        self.ctx, self.timeout_s = ctx, timeout_s
        self._slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._closed = False

    def submit(self, file_id: str) -> None:
        with self._lock:
            if self._closed or file_id in self._threads:
                return
            thread = threading.Thread(target=self._run, args=(file_id,), name=f"audit-{file_id}", daemon=True)
            self._threads[file_id] = thread
        thread.start()

    def resume(self) -> None:
        for row in self.ctx.store.files(limit=sys.maxsize, newest_first=False):
            if row["status"] == "uploaded":
                self.submit(row["id"])

    def stop(self, file_id: str) -> None:
        """Kill the audit of a file (deleted); its thread then records nothing."""
        with self._lock:
            proc = self._procs.get(file_id)
        if proc is not None:
            proc.kill()

    def close(self, timeout_s: float = 10) -> None:
        with self._lock:
            self._closed = True
            procs, threads = list(self._procs.values()), list(self._threads.values())
        for proc in procs:
            proc.terminate()
        for thread in threads:
            thread.join(timeout_s)

    def _run(self, file_id: str) -> None:
        try:
            with self._slots:
                self._audit(file_id)
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave the file 'uploaded' forever
            log.exception("audit of %s failed", file_id)
            self.ctx.store.update_file(file_id, status="error",
                                       status_details=f"the audit failed ({type(exc).__name__}: {exc}); see the "
                                                      "server log")
        finally:
            with self._lock:
                self._threads.pop(file_id, None)

    def _audit(self, file_id: str) -> None:
        store, layout = self.ctx.store, self.ctx.layout
        if self._closed or store.file(file_id) is None:
            return
        with self._lock:
            proc = subprocess.Popen(audit_argv(self.ctx, file_id), cwd=layout.file_path(file_id).parent,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, errors="replace")
            self._procs[file_id] = proc
        try:
            _, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            stderr += f"\nerror: the audit took longer than {self.timeout_s:.0f} s and was stopped"
        finally:
            with self._lock:
                self._procs.pop(file_id, None)
        if store.file(file_id) is None:  # deleted meanwhile
            layout.audit_path(file_id).unlink(missing_ok=True)
            return
        if self._closed and proc.returncode != 0:
            return  # stopped by the shutdown: audited again on the next start
        if proc.returncode != 0:
            store.update_file(file_id, status="error", status_details=_error_text(stderr, file_id), audit=None)
            return
        report = _renamed(json.loads(layout.audit_path(file_id).read_text(encoding="utf-8")), file_id)
        report["model"] = self.ctx.base_name  # not base_spec: that may be a server path
        store.update_file(file_id, status="processed", status_details=summary(report), audit=report)


def auditor(ctx: JobsContext) -> Auditor:
    if ctx.auditor is None:
        ctx.auditor = Auditor(ctx)
    return ctx.auditor


def audit_pending(ctx: JobsContext) -> list[str]:
    """Ids of the files whose audit has not finished (status `uploaded`)."""
    return [r["id"] for r in ctx.store.files(limit=sys.maxsize) if r["status"] == "uploaded"]


def wait_for_audits(ctx: JobsContext, file_ids=None, timeout_s: float = 300, poll_s: float = 0.1) -> bool:
    """Block until the given files (default: all) are audited; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = set(audit_pending(ctx))
        if not (pending if file_ids is None else pending & set(file_ids)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


# ------------------------------------------------------------------------------ routes

def routes(app, ctx: JobsContext) -> None:
    """Add the /v1/files routes to `app` and audit the files a previous server left unaudited.
    The Guard in front of `app` needs body_limits(ctx) for uploads over its default body limit."""
    auditor(ctx).resume()

    @app.post("/v1/files")
    async def upload_file(request: Request):
        return await create_file(ctx, request)

    @app.get("/v1/files")
    async def files(request: Request):
        return list_files(ctx, request.query_params)

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str):
        return file_object(get_file(ctx, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str):
        get_file(ctx, file_id)
        return FileResponse(ctx.layout.file_path(file_id), media_type="application/octet-stream")

    @app.get("/v1/files/{file_id}/audit")
    async def audit(file_id: str):
        return audit_report(ctx, file_id)

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str):
        return delete_file(ctx, file_id)
