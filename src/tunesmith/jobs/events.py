"""A job's run directory read back as OpenAI's events and checkpoints.

`tunesmith train` writes metrics.jsonl (one record per logged step: training records carry
`loss`, validation records `val_loss` and other `val_*` keys, at the same step) and prints
"step N/M ... ETA h:mm:ss" progress lines; both are read here, never the trainer's objects.

Events: new metrics.jsonl lines become "metrics" events. The runner keeps a byte offset per job
(jobs.metrics_offset). The file moves (staging folder renamed to the run directory: same file, the
offset stays valid) and, on --resume, is cut back to the checkpoint's step and written anew
(training/run.py truncate_metrics): steps after the checkpoint are logged again. So a record is
taken only once per step and kind (jobs.step: last training step taken, jobs.valid_step: last
validation step), whatever the offset says: re-reading never duplicates an event.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from tunesmith.jobs import spec as jobspec
from tunesmith.jobs.store import now

PROGRESS_RE = re.compile(r"^step\s+(\d+)/(\d+)\s+loss\b.*?ETA (\d+):(\d\d):(\d\d)", re.M)
LOG_TAIL_BYTES = 16 << 10
# metrics.jsonl key -> event data key (OpenAI's names where OpenAI has one)
RENAMES = {"loss": "train_loss", "lr": "learning_rate", "val_loss": "valid_loss"}
_INODES: dict[str, int] = {}  # job id -> inode of the metrics.jsonl last read (this process)
_EVAL_EVERY: dict[str, int | None] = {}  # job id -> train.eval_every, None: no validation


def metrics_path(ctx, job_id: str) -> Path | None:
    live = ctx.layout.live_run_dir(job_id)
    return live / "metrics.jsonl" if live is not None else None


def _data(record: dict) -> dict:
    out = {}
    for key, value in record.items():
        if key in RENAMES:
            out[RENAMES[key]] = value
        elif key.startswith("val_"):
            out["valid_" + key[4:]] = value
        else:
            out[key] = value
    return out


def _message(data: dict, total: int | None) -> str:
    where = f"Step {data['step']}/{total}" if total else f"Step {data['step']}"
    parts = []
    if "train_loss" in data:
        parts.append(f"training loss={data['train_loss']:.4g}")
    if data.get("valid_loss") is not None:
        parts.append(f"validation loss={data['valid_loss']:.4g}")
    return f"{where}: {', '.join(parts) or 'metrics logged'}"


def progress(log_path: Path) -> tuple[int, int, int] | None:
    """(step, total steps, ETA seconds) of the last progress line in the log's tail."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = PROGRESS_RE.findall(tail)
    if not found:
        return None
    step, total, h, m, s = (int(x) for x in found[-1])
    return step, total, h * 3600 + m * 60 + s


def _records(path: Path, offset: int) -> tuple[list[tuple[dict, int]], int]:
    """(record, offset of its line) of the complete lines after `offset` (a line still being
    written waits for the next read), and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:  # between the staging folder's rename and the next look
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records, at = [], offset
    for line in chunk[:end].splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None  # never written by MetricsLogger: skip rather than stop the job's events
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append((rec, at))
        at += len(line)
    return records, offset + end


def _validation_due(ctx, job_id: str, step: int, total: int | None) -> bool:
    """Whether the run evaluates at `step` (training/loop.py: with a validation file, every
    train.eval_every steps and at the last step): its training record then waits for that
    validation record, so that one event says both, as OpenAI's do."""
    if job_id not in _EVAL_EVERY:
        try:
            cfg = yaml.safe_load(ctx.layout.config_path(job_id).read_text())
            _EVAL_EVERY[job_id] = (cfg["train"].get("eval_every") or 0) if cfg["data"].get("validation") else None
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            _EVAL_EVERY[job_id] = None
    every = _EVAL_EVERY[job_id]
    return every is not None and (step == total or (every > 0 and step % every == 0))


def ingest(ctx, job_id: str, final: bool = False) -> int:
    """Turn the job's new metrics.jsonl lines into events and update its progress columns.
    `final`: the process has ended, take every line. Returns the number of events added."""
    store = ctx.store
    job = store.job(job_id)
    path = metrics_path(ctx, job_id)
    if job is None or path is None:
        return 0
    offset = job["metrics_offset"] or 0
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    # a new file (--resume wrote it anew) or a shorter one: read it whole again, duplicates are skipped
    if st.st_size < offset or _INODES.get(job_id, st.st_ino) != st.st_ino:
        offset = 0
    _INODES[job_id] = st.st_ino
    records, offset = _records(path, offset)
    seen = progress(ctx.layout.log_path(job_id))
    total = (seen[1] if seen else None) or job["total_steps"]
    step, valid_step = job["step"] or 0, job["valid_step"] or 0
    added = 0
    pending = None  # (event data, line offset, step before it): a training record, waiting for its validation

    def flush(data: dict) -> None:
        nonlocal added
        store.add_event(job_id, _message(data, total), type="metrics", data=data)
        added += 1

    for rec, at in records:
        data = {"step": rec["step"], "total_steps": total, **_data(rec)}
        if "loss" in rec:
            if rec["step"] <= step:
                continue
            if pending is not None:
                flush(pending[0])
            pending, step = (data, at, step), rec["step"]
        elif any(k.startswith("val_") for k in rec):
            if rec["step"] <= valid_step:
                continue
            valid_step = rec["step"]
            if pending is not None and pending[0]["step"] == rec["step"]:
                flush({**pending[0], **{k: v for k, v in data.items() if k.startswith("valid_")}})
                pending = None
            else:
                flush(data)
    if pending is not None:
        if not final and _validation_due(ctx, job_id, pending[0]["step"], total):
            offset, step = pending[1], pending[2]  # read it again with its validation record
        else:
            flush(pending[0])
    fields = {"metrics_offset": offset, "step": step or None, "valid_step": valid_step or None}
    if total:
        fields["total_steps"] = total
    if seen and job["status"] == "running" and not final:
        fields["estimated_finish"] = now() + seen[2]
    store.update_job(job_id, **fields)
    return added


def resume_offset(staging: Path, step: int) -> int:
    """Bytes of metrics.jsonl that a --resume from checkpoint `step` keeps (its records up to that
    step, written back as MetricsLogger wrote them): where the resumed run's new lines begin."""
    path = staging / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept = 0
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            kept += len((json.dumps(rec) + "\n").encode("utf-8"))
    return kept


def _metrics_by_step(path: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("step"), int):
            out.setdefault(rec["step"], {}).update(_data(rec))
    return out


def checkpoints(ctx, job_id: str) -> list[dict]:
    """The run's complete checkpoints as OpenAI's fine_tuning.job.checkpoint objects, newest first."""
    from tunesmith.training.checkpoint import checkpoint_dirs  # torch: only when asked

    job = ctx.store.job(job_id)
    live = ctx.layout.live_run_dir(job_id)
    if job is None or live is None:
        return []
    metrics = _metrics_by_step(live / "metrics.jsonl")
    model = job["fine_tuned_model"] or jobspec.fine_tuned_model_name(ctx.base_name, job["suffix"], job_id)
    out = []
    for ckpt in reversed(checkpoint_dirs(live / "checkpoints")):
        step = int(ckpt.name.split("-")[1])
        try:
            created = int((ckpt / "state.json").stat().st_mtime)
        except FileNotFoundError:  # pruned (keep_last) since it was listed
            continue
        out.append({"object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
                    "created_at": created,
                    "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}",
                    "fine_tuning_job_id": job_id,
                    "metrics": {"step": step, **{k: v for k, v in metrics.get(step, {}).items() if k != "step"}},
                    "step_number": step})
    return out
