"""The /v1/fine_tuning/jobs routes, in OpenAI's shapes: create, list (after/limit), retrieve,
cancel, pause, resume, events, checkpoints. The `openai` client's fine_tuning.jobs.* calls work
against them unchanged (tests/test_jobs_openai.py).

A create is checked whole before anything is written: the files exist, the request becomes a
Config that `tunesmith train` accepts (jobs/spec.py), and only then are the job's folder, its
config.yaml and its row made. Everything after that (file audits, the queue, the subprocess) is
the runner's.
"""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tunesmith.atomic import write_text
from tunesmith.config import dump_config
from tunesmith.jobs import spec as s
from tunesmith.jobs.context import JobsContext
from tunesmith.jobs.layout import checked, new_id
from tunesmith.jobs.store import TERMINAL
from tunesmith.serve import checks as c
from tunesmith.serve.protocol import APIError

ORGANIZATION = "org-tunesmith"  # OpenAI's field; one local organisation
MAX_REQUEST_BYTES = 1 << 20
MAX_PAGE = 100


# ------------------------------------------------------------------------------ shapes

def job_object(row: dict) -> dict:
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": ORGANIZATION, "result_files": [], "status": row["status"],
        "training_file": row["training_file"], "validation_file": row["validation_file"],
        "hyperparameters": row["hyperparameters"], "method": row["method"], "trained_tokens": row["trained_tokens"],
        "error": row["error"], "seed": row["seed"], "estimated_finish": row["estimated_finish"],
        "integrations": [], "metadata": row["metadata"], "user_provided_suffix": row["suffix"],
        # tunesmith's own fields: progress, and the config keys the request set
        "step": row["step"], "total_steps": row["total_steps"], "tunesmith": row["tunesmith"] or {},
    }


def event_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{row['seq']}", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"] or {}, "type": row["type"]}


def _page(items: list, limit: int) -> dict:
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise APIError(400, f"limit must be an integer from 1 to {MAX_PAGE} (got {raw!r})", param="limit")
    return int(raw)


# ------------------------------------------------------------------------------ lookups

def get_job(ctx: JobsContext, job_id: str) -> dict:
    try:
        row = ctx.store.job(checked(job_id, "ftjob"))
    except ValueError:
        row = None
    if row is None:
        raise APIError(404, f"Could not find fine-tuning job: {job_id!r}", param="fine_tuning_job_id",
                       code="not_found")
    return row


def _file(ctx: JobsContext, file_id, param: str) -> dict:
    try:
        row = ctx.store.file(checked(file_id, "file"))
    except ValueError:
        row = None
    if row is None:
        raise APIError(400, f"{param} {file_id!r} does not exist: upload it with POST /v1/files first", param=param,
                       code="invalid_file")
    if row["status"] == "error":
        raise APIError(400, f"{param} {file_id} failed its checks: {row['status_details']}", param=param,
                       code="invalid_file")
    return row


def _rows(path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------ create

def create_job(ctx: JobsContext, payload) -> dict:
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    train = _file(ctx, payload.get("training_file"), "training_file")
    valid = _file(ctx, payload["validation_file"], "validation_file") if payload.get("validation_file") else None
    job_id = new_id("ftjob")
    lay = ctx.layout
    rows = _rows(lay.file_path(train["id"]))
    try:
        spec, cfg = s.build(payload, ctx.base_name, ctx.base_spec, lay.file_path(train["id"]),
                            lay.file_path(valid["id"]) if valid else None, lay.runs_dir(job_id), train_rows=rows)
    except s.SpecError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    lay.job_dir(job_id).mkdir(parents=True)
    write_text(lay.config_path(job_id), dump_config(cfg))
    req = spec.request
    ctx.store.add_job(
        id=job_id, model=req.model, status="validating_files", method=spec.method,
        hyperparameters=spec.hyperparameters, tunesmith=spec.tunesmith, training_file=train["id"],
        validation_file=valid["id"] if valid else None, suffix=req.suffix, seed=spec.seed, metadata=req.metadata,
        total_steps=s.total_steps(cfg, rows))
    ctx.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    ctx.runner.enqueue(job_id)
    return job_object(ctx.store.job(job_id))


# ------------------------------------------------------------------------------ control

def control(ctx: JobsContext, job_id: str, action: str) -> dict:
    row = get_job(ctx, job_id)
    status = row["status"]
    if action == "cancel" and status in TERMINAL:
        raise APIError(400, f"job {job_id} has already {_past(status)}; there is nothing to cancel",
                       param="fine_tuning_job_id", code="invalid_state")
    if action == "pause" and status != "running":
        raise APIError(400, f"job {job_id} is {status}: only a running job can be paused",
                       param="fine_tuning_job_id", code="invalid_state")
    if action == "resume" and status != "paused":
        raise APIError(400, f"job {job_id} is {status}: only a paused job can be resumed",
                       param="fine_tuning_job_id", code="invalid_state")
    getattr(ctx.runner, action)(job_id)
    return job_object(get_job(ctx, job_id))


def _past(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}[status]


# ------------------------------------------------------------------------------ routes

def routes(app, ctx: JobsContext) -> None:
    base = "/v1/fine_tuning/jobs"

    @app.post(base)
    async def create(request: Request):
        payload = await c.json_body(request, MAX_REQUEST_BYTES)
        return await run_in_threadpool(create_job, ctx, payload)

    @app.get(base)
    async def list_jobs(request: Request):
        limit = _limit(request, 20)
        after = request.query_params.get("after")
        rows = await run_in_threadpool(ctx.store.jobs, after, limit + 1)
        return _page([job_object(r) for r in rows], limit)

    @app.get(base + "/{job_id}")
    async def retrieve(job_id: str):
        return job_object(get_job(ctx, job_id))

    for action in ("cancel", "pause", "resume"):
        app.add_api_route(base + "/{job_id}/" + action, _control_route(ctx, action), methods=["POST"])

    @app.get(base + "/{job_id}/events")
    async def events(job_id: str, request: Request):
        get_job(ctx, job_id)
        limit = _limit(request, 20)
        after = request.query_params.get("after")
        after_seq = None
        if after is not None:
            tail = after.removeprefix("ftevent-")
            if not tail.isdigit():
                raise APIError(400, f"after must be an event id (ftevent-N), got {after!r}", param="after")
            after_seq = int(tail)
        rows = await run_in_threadpool(ctx.store.events, job_id, after_seq, limit + 1)
        return _page([event_object(r) for r in rows], limit)

    @app.get(base + "/{job_id}/checkpoints")
    async def checkpoints(job_id: str, request: Request):
        from tunesmith.jobs.events import checkpoints as list_checkpoints

        get_job(ctx, job_id)
        limit = _limit(request, 10)
        items = await run_in_threadpool(list_checkpoints, ctx, job_id)
        after = request.query_params.get("after")
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return _page(items, limit)


def _control_route(ctx: JobsContext, action: str):
    async def route(job_id: str):
        return await run_in_threadpool(control, ctx, job_id, action)
    route.__name__ = f"{action}_job"
    return route
