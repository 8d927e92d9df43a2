"""The jobs runner (jobs/runner.py, jobs/events.py) on real `tunesmith train` subprocesses of a tiny
model: a job runs to succeeded with its metrics as events and its checkpoints listed; a failure keeps
its log and says why; cancel stops the process and removes nothing finished. (Pause/resume and a
server killed with SIGKILL, ending with the very weights of an uninterrupted run, are
tests/test_jobs_restart.py, through the real server.)

Trainings that must be caught mid-run are slowed by tests/jobs_hooks (a sleep after each logged
step, which changes no weight). Fast unit checks (file validation, events from a metrics.jsonl cut
back by --resume, restart recovery of an orphan) start no training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunesmith.config import dump_config
from tunesmith.jobs import events, spec
from tunesmith.jobs.context import JobsContext, JobsLimits
from tunesmith.jobs.layout import Layout, new_id
from tunesmith.jobs.procs import alive, last_error
from tunesmith.jobs.runner import JobRunner
from tunesmith.jobs.store import JobStore
from tunesmith.training.checkpoint import checkpoint_dirs

from conftest import ROOT, write_jsonl

HOOKS = Path(__file__).parent / "jobs_hooks"
BASE = "tiny"
ROWS, VALID_ROWS = 16, 4
TOTAL = ROWS * 2 // 2  # 2 epochs of batch 2
DELAY_S = "0.3"


def make_ctx(root: Path, model_dir: Path, concurrency: int | None = None) -> JobsContext:
    layout = Layout.create(root)
    return JobsContext(JobStore(layout.db), layout, BASE, str(model_dir), limits=JobsLimits(concurrency=concurrency))


def add_file(ctx: JobsContext, rows: list[dict], status: str = "processed") -> str:
    file_id = new_id("file")
    path = write_jsonl(ctx.layout.file_path(file_id), rows)
    ctx.store.add_file(id=file_id, filename="train.jsonl", purpose="fine-tune", bytes=path.stat().st_size,
                       status=status)
    return file_id


def add_job(ctx: JobsContext, train: str, valid: str | None, rows: int = ROWS, **extension) -> str:
    """What the API does: the request built into a Config, config.yaml written, the row inserted."""
    job_id = new_id("ftjob")
    payload = {"model": BASE, "training_file": train, "validation_file": valid, "seed": 7, "suffix": "t",
               "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
               "tunesmith": {"train.save_every": 2, "train.lr": 1e-2, "method.r": 8,
                             **({"train.eval_every": 4} if valid else {}), **extension}}
    job, cfg = spec.build(payload, BASE, ctx.base_spec, ctx.layout.file_path(train),
                          ctx.layout.file_path(valid) if valid else None, ctx.layout.runs_dir(job_id), rows)
    ctx.layout.job_dir(job_id).mkdir(parents=True)
    ctx.layout.config_path(job_id).write_text(dump_config(cfg))
    ctx.store.add_job(id=job_id, model=BASE, status="validating_files", method=job.method,
                      hyperparameters=job.hyperparameters, tunesmith=job.tunesmith, training_file=train,
                      validation_file=valid, suffix="t", seed=job.seed, total_steps=spec.total_steps(cfg, rows))
    return job_id


def data_rows():
    from tunesmith.demo.orders import make_splits

    return make_splits(3, {"train": ROWS, "validation": VALID_ROWS})


def job_with_data(ctx, **extension) -> str:
    splits = data_rows()
    return add_job(ctx, add_file(ctx, splits["train"]), add_file(ctx, splits["validation"]), **extension)


def metrics_steps(ctx, job_id) -> list[int]:
    return [e["data"]["step"] for e in ctx.store.events_since(job_id) if e["type"] == "metrics"
            and "train_loss" in e["data"]]


def messages(ctx, job_id) -> list[str]:
    return [e["message"] for e in ctx.store.events_since(job_id)]


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


def staged_checkpoint(ctx, job_id) -> bool:
    live = ctx.layout.live_run_dir(job_id)
    return live is not None and live.name.startswith(".") and bool(checkpoint_dirs(live / "checkpoints"))


@pytest.fixture
def slow_steps(monkeypatch):
    """Trainings started from now on sleep after each step (tests/jobs_hooks)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TUNESMITH_TEST_STEP_DELAY", DELAY_S)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """One job run to the end, uninterrupted: the weights every resumed job must reproduce."""
    ctx = make_ctx(tmp_path_factory.mktemp("jobs-ref"), tiny_model_dir)
    runner = JobRunner(ctx, poll_s=0.2)
    ctx.runner = runner
    runner.start()
    job_id = job_with_data(ctx)
    runner.enqueue(job_id)
    started = time.monotonic()
    job = runner.wait(job_id, timeout=300)
    seconds = time.monotonic() - started
    yield ctx, runner, job_id, job, seconds
    runner.close()


# ---------------------------------------------------------------------------------------- trainings
def test_job_succeeds_with_metrics_events_and_checkpoints(reference):
    ctx, runner, job_id, job, _ = reference
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"] == spec.fine_tuned_model_name(BASE, "t", job_id) == f"ft:tiny:t:{job_id[6:]}"
    run = ctx.layout.run_dir(job_id)
    manifest = json.loads((run / "manifest.json").read_text())
    assert job["trained_tokens"] == manifest["trained_tokens"] > 0
    assert job["step"] == job["total_steps"] == TOTAL and job["finished_at"] and job["pid"] is None
    # one metrics event per step, in order, messages in OpenAI's form, validation merged into its step
    metrics = [e for e in ctx.store.events_since(job_id) if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == list(range(1, TOTAL + 1))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r}
    valid = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(valid) == [4, 8, 12, 16]
    for e in metrics:
        d, step = e["data"], e["data"]["step"]
        assert d["train_loss"] == train[step]["loss"] and d["learning_rate"] == train[step]["lr"]
        assert d["total_steps"] == TOTAL and d["tokens_per_s"] == train[step]["tokens_per_s"]
        assert d.get("valid_loss") == valid.get(step)
        loss = f"Step {step}/{TOTAL}: training loss={d['train_loss']:.4g}"
        assert e["message"] == (loss + f", validation loss={valid[step]:.4g}" if step in valid else loss)
    losses = [e["data"]["train_loss"] for e in metrics]
    assert sum(losses[-4:]) < sum(losses[:4])  # it learned (lr 1e-2 on a tiny model)
    said = messages(ctx, job_id)
    assert said.index("Files validated, moving job to queued state") < said.index("Fine-tuning job started") \
        < said.index("The job has successfully completed")
    # checkpoints, newest first, with the metrics of their step
    cps = events.checkpoints(ctx, job_id)
    steps = [c["step_number"] for c in cps]
    assert steps == sorted(steps, reverse=True) and steps[0] == TOTAL
    assert {int(p.name.split("-")[1]) for p in checkpoint_dirs(run / "checkpoints")} == set(steps)
    top = cps[0]
    assert top["id"] == f"ftckpt-{job_id[6:]}-{TOTAL}" and top["fine_tuning_job_id"] == job_id
    assert top["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-{TOTAL}"
    assert top["metrics"]["train_loss"] == train[TOTAL]["loss"] and top["metrics"]["valid_loss"] == valid[TOTAL]
    # cancelling a finished job changes and removes nothing
    assert runner.cancel(job_id)["status"] == "succeeded"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_failure_at_train_time_keeps_log_and_error(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path / "jobs", tiny_model_dir)
    rows = data_rows()["train"]
    rows[3] = {"messages": [{"role": "user", "content": "no answer"}]}  # valid JSON, invalid example
    train = add_file(ctx, rows)
    job_id = add_job(ctx, train, None)
    runner = JobRunner(ctx, poll_s=0.2)
    runner.start()
    try:
        runner.enqueue(job_id)
        job = runner.wait(job_id, timeout=180)
    finally:
        runner.close()
    log = ctx.layout.log_path(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "training_failed" and job["error"]["param"] is None
    text = log.read_text()
    error_line = [ln for ln in text.splitlines() if ln.startswith("error: ")][-1]
    assert error_line.endswith(f"{ctx.layout.file_path(train)}:4: no assistant message, so nothing to train on")
    # the API's message names the upload by id and line, not by its path on the server
    assert job["error"]["message"] == f"{train} line 4: no assistant message, so nothing to train on"
    assert str(ctx.layout.root) in last_error(log) and str(ctx.layout.root) not in job["error"]["message"]
    assert f"Fine-tuning job failed: {job['error']['message']}" in messages(ctx, job_id)
    assert job["fine_tuned_model"] is None and not ctx.layout.run_dir(job_id).exists()


def test_cancel_running_and_queued_and_outside_sigterm(tmp_path, tiny_model_dir, slow_steps):
    ctx = make_ctx(tmp_path / "jobs", tiny_model_dir, concurrency=1)
    first, second = job_with_data(ctx), job_with_data(ctx)
    runner = JobRunner(ctx, poll_s=0.1)
    runner.start()
    try:
        runner.enqueue(first)
        runner.enqueue(second)
        wait_until(lambda: staged_checkpoint(ctx, first), what="a checkpoint of the first job")
        assert ctx.store.job(second)["status"] == "queued"  # concurrency 1
        assert runner.cancel(second)["status"] == "cancelled"  # queued: at once, never started
        # a SIGTERM from outside (a service manager stopping everything) is no failure: resumed
        os.killpg(ctx.store.job(first)["pid"], signal.SIGTERM)
        wait_until(lambda: ctx.store.job(first)["attempts"] == 2 and ctx.store.job(first)["status"] == "running",
                   what="the interrupted job running again")
        assert any(m.startswith("The training process was stopped from outside") for m in messages(ctx, first))
        assert "--resume" in ctx.layout.log_path(first).read_text().rsplit("=== tunesmith jobs:", 1)[1]
        pid = ctx.store.job(first)["pid"]
        job = runner.cancel(first, wait_s=60)
        assert job["status"] == "cancelled" and job["error"] is None and job["pid"] is None
        assert not alive(pid)
        time.sleep(0.5)  # the runner would start the next queued job now: none is left
        assert runner.running() == []
    finally:
        runner.close()
    second_job = ctx.store.job(second)
    assert second_job["attempts"] == 0 and not ctx.layout.log_path(second).exists()
    assert ctx.layout.log_path(first).is_file() and "Job cancelled" in messages(ctx, first)
    assert staged_checkpoint(ctx, first)  # what it had made stays (tunesmith train keeps checkpoints)


# Pause/resume to the uninterrupted weights, and the restart after a kill -9 of the server:
# tests/test_jobs_restart.py, through the real `tunesmith serve --jobs`.


# ---------------------------------------------------------------------------------------- no training
def test_files_must_be_processed_before_queueing(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path / "jobs", tiny_model_dir)
    splits = data_rows()
    pending = add_file(ctx, splits["train"], status="uploaded")
    good = add_job(ctx, pending, None)
    bad_file = add_file(ctx, splits["validation"], status="error")
    ctx.store.update_file(bad_file, status_details="line 2: no assistant message")
    bad = add_job(ctx, pending, bad_file)
    runner = JobRunner(ctx)
    runner._check_files()
    assert ctx.store.job(good)["status"] == "validating_files"
    failed = ctx.store.job(bad)
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_file"
    assert failed["error"]["param"] == "validation_file" and "line 2: no assistant message" in failed["error"]["message"]
    ctx.store.update_file(pending, status="processed")
    runner._check_files()
    assert ctx.store.job(good)["status"] == "queued"


def test_events_survive_a_resume_that_cuts_metrics_back(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path / "jobs", tiny_model_dir)
    job_id = add_job(ctx, add_file(ctx, data_rows()["train"]), None)
    staging = ctx.layout.runs_dir(job_id) / ".run.incomplete-4000000"
    staging.mkdir(parents=True)
    metrics = staging / "metrics.jsonl"
    rec = lambda s: {"step": s, "elapsed_s": 0.1 * s, "loss": 2.0 / s, "lr": 0.01, "tokens_per_s": 10.0}
    lines = [rec(1), rec(2), {"step": 2, "val_loss": 1.5}, rec(3)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # last line half-written
    ctx.layout.log_path(job_id).write_text("step     3/16  loss  0.6667  lr 1.00e-02     10.0 tok/s  ETA 0:00:26\n")
    ctx.store.update_job(job_id, status="running")
    assert events.ingest(ctx, job_id) == 3
    evs = [e for e in ctx.store.events_since(job_id) if e["type"] == "metrics"]
    assert [e["message"] for e in evs] == ["Step 1/16: training loss=2", "Step 2/16: training loss=1, "
                                           "validation loss=1.5", "Step 3/16: training loss=0.6667"]
    job = ctx.store.job(job_id)
    assert (job["step"], job["valid_step"], job["total_steps"]) == (3, 2, 16)
    assert abs(job["estimated_finish"] - (time.time() + 26)) < 5
    # --resume from step 2 writes the file anew with steps 1-2, then trains 3 and 4 again
    assert events.resume_offset(staging, 2) == len("".join(json.dumps(r) + "\n" for r in lines[:3]).encode())
    kept = "".join(json.dumps(r) + "\n" for r in lines[:3])
    tmp = staging / "m.tmp"
    tmp.write_text(kept + json.dumps(rec(3)) + "\n" + json.dumps(rec(4)) + "\n")
    os.replace(tmp, metrics)
    assert events.ingest(ctx, job_id) == 1
    assert metrics_steps(ctx, job_id) == [1, 2, 3, 4]


def test_recover_stops_the_orphan_and_requeues(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path / "jobs", tiny_model_dir)
    job_id = add_job(ctx, add_file(ctx, data_rows()["train"]), None)
    config = str(ctx.layout.config_path(job_id))
    # a process standing for a training left by a dead server: its command line names the job's config
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", config], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    other = add_job(ctx, add_file(ctx, data_rows()["train"]), None)
    try:
        ctx.store.update_job(job_id, status="running", pid=orphan.pid, attempts=1)
        ctx.store.update_job(other, status="running", pid=stranger.pid, attempts=1)  # a reused pid: not ours
        JobRunner(ctx).recover()
        assert orphan.wait(timeout=30) == -signal.SIGTERM
        assert stranger.poll() is None
    finally:
        orphan.kill()
        stranger.kill()
        stranger.wait()
    for ident in (job_id, other):
        job = ctx.store.job(ident)
        assert (job["status"], job["resume"], job["pid"]) == ("queued", 1, None)
    assert any("left by the previous server" in m for m in messages(ctx, job_id))
    assert not any("left by the previous server" in m for m in messages(ctx, other))


def test_tasks_run_one_at_a_time_and_report_failures(reference):
    ctx, runner, job_id, _, _ = reference
    run = ctx.layout.run_dir(job_id)
    ok_id, bad_id = new_id("task"), new_id("task")
    out = ctx.layout.task_dir(job_id, ok_id)
    runner.submit_task(job_id, "export", ["export", str(run), "--format", "adapter", "--out", str(out / "adapter")],
                       out, task_id=ok_id)
    bad_out = ctx.layout.task_dir(job_id, bad_id)
    runner.submit_task(job_id, "export", ["export", str(run.parent / "missing"), "--format", "adapter"], bad_out,
                       task_id=bad_id)
    assert ctx.store.task(bad_id)["status"] == "queued"  # the first one goes first
    wait_until(lambda: ctx.store.task(bad_id)["status"] in ("succeeded", "failed"), timeout=120, what="both tasks")
    ok, bad = ctx.store.task(ok_id), ctx.store.task(bad_id)
    assert ok["status"] == "succeeded" and ok["error"] is None, ctx.layout.task_log(job_id, ok_id).read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert bad["status"] == "failed" and "missing" in bad["error"]
    assert ok["finished_at"] <= bad["finished_at"]
    with pytest.raises(ValueError, match="task kind"):
        runner.submit_task(job_id, "train", ["train"], out)


def test_one_job_per_gpu(monkeypatch, tmp_path, tiny_model_dir):
    from tunesmith.jobs.runner import _Child

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the server's own share of the machine's GPUs
    ctx = make_ctx(tmp_path / "jobs", tiny_model_dir)
    runner = JobRunner(ctx)
    runner._gpus = runner._visible_gpus()
    assert runner._gpus == ["3", "5"] and runner._limit() == 2
    runner._jobs["a"] = _Child("a", proc=None, gpu="3")
    assert runner._free_gpu() == "5"
    ctx.limits.concurrency = 3  # more jobs than GPUs: they share, the least used first
    runner._jobs["b"] = _Child("b", proc=None, gpu="5")
    runner._jobs["c"] = _Child("c", proc=None, gpu="5")
    assert runner._limit() == 3 and runner._free_gpu() == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner._visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runner._gpus = runner._visible_gpus()
    ctx.limits.concurrency = None
    assert runner._gpus == [] and runner._limit() == 1 and runner._free_gpu() is None
