"""The job queue: each job a `tunesmith train` subprocess.

JobRunner(ctx, poll_s=0.5)
  start()                 recover() then the runner thread. recover(): jobs left `running` by a
                          server that died are requeued with resume (a still-alive orphan train
                          process of that job is stopped first); `queued` ones stay queued.
  close()                 stop the thread; SIGTERM running trainings and wait for them: they stay
                          `running` in the store (checkpoints kept by `tunesmith train`) and are
                          resumed on the next start().
  enqueue(job_id)         a job row (status validating_files or queued) whose config.yaml exists.
                          validating_files -> queued once its files' audits are done (file status
                          processed), -> failed when one is `error`.
  cancel(job_id) -> row   queued/validating/paused: cancelled at once; running: SIGTERM, then
                          cancelled. Terminal jobs are left as they are (nothing removed).
  pause(job_id) -> row    running: SIGTERM (the run keeps its checkpoints), status paused.
  resume(job_id) -> row   paused: queued again; started with --resume when a checkpoint exists.
  submit_task(job_id, kind, argv, out_dir) -> task row
                          a CLI subprocess for the job (kind: export | compare); its log under
                          layout.task_log; status queued -> running -> succeeded | failed
                          (| cancelled: cancel_task, or the server stopped while it ran).
Each loop: ingest new metrics.jsonl lines as events (events.py), reap exited processes
(exit 0 + run dir -> succeeded, with fine_tuned_model and trained_tokens; else failed with the
log's error line), start queued jobs while fewer than the concurrency limit run.

Every child is started by the runner thread alone (procs.py: PDEATHSIG follows the forking
thread, so a kill -9 of the server stops its trainings, which keep their checkpoints).
cancel/pause only signal; the runner thread reaps and records the outcome, with the intent kept in
jobs.control so that a server dying in between still ends the job the way it was asked.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.jobs import events
from tunesmith.jobs.layout import RUN_NAME, new_id
from tunesmith.jobs.procs import STOP_WAIT_S, alive, cmdline, last_error, signal_group, spawn, stop
from tunesmith.jobs.spec import fine_tuned_model_name
from tunesmith.jobs.store import TERMINAL, now

TASK_KINDS = ("export", "compare")
# exit statuses of a training stopped by SIGINT/SIGTERM (tunesmith train exits 130 once it has
# cleaned up; -N: the signal came before its handler was installed)
INTERRUPTED = frozenset({130, -signal.SIGTERM, -signal.SIGINT})
MAX_ATTEMPTS = 5  # interrupted from outside this often: stop requeueing, fail


class JobStateError(ValueError):
    """The job is not in a state that allows this (e.g. pausing a finished job)."""


@dataclass
class _Child:
    ident: str
    proc: subprocess.Popen
    gpu: str | None = None
    job_id: str | None = None       # a task's job
    cancelled: bool = False         # a task asked to stop
    signalled: float | None = None  # when SIGTERM was sent (monotonic): SIGKILL once STOP_WAIT_S have passed
    done: threading.Event = field(default_factory=threading.Event)


class JobRunner:
    def __init__(self, ctx, poll_s: float = 0.5):
        self.ctx, self.store, self.layout = ctx, ctx.store, ctx.layout
        self.poll_s = poll_s
        self._jobs: dict[str, _Child] = {}
        self._tasks: dict[str, _Child] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus: list[str] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._gpus = self._visible_gpus()
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-jobs-runner", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            children = [*self._jobs.values(), *self._tasks.values()]
            for child in children:
                signal_group(child.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_WAIT_S
            for child in children:
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    signal_group(child.proc.pid, signal.SIGKILL)
                    child.proc.wait()
                child.done.set()
            for task_id in self._tasks:  # tasks are not resumed: say why it ended
                self.store.update_task(task_id, status="cancelled", finished_at=now(), pid=None,
                                       error="the server stopped while it ran; submit it again")
            self._jobs.clear()  # their rows stay `running`: the next start() resumes them
            self._tasks.clear()

    def recover(self) -> None:
        """Put the store back in step with the processes after a server that died."""
        for job in self.store.jobs(statuses=["running"]):
            job_id = job["id"]
            if job_id in self._jobs:
                continue
            pid = job["pid"]
            if pid and alive(pid) and str(self.layout.config_path(job_id)) in cmdline(pid):
                stop(pid)
                self.store.add_event(job_id, f"Stopped the training process (pid {pid}) left by the previous server")
            if self._finished(job_id):
                continue
            if job["control"] in ("cancel", "pause"):
                self._settle(job_id, None)
                continue
            self.store.set_status(job_id, "queued", "The server restarted while the job ran: queued again, to "
                                  "resume from its last checkpoint", pid=None, resume=1, estimated_finish=None)
        for task in self.store.tasks(statuses=["running"]):
            self.store.update_task(task["id"], status="cancelled", finished_at=now(), pid=None,
                                   error="the server stopped while it ran; submit it again")

    # ------------------------------------------------------------------ requests (any thread)
    def enqueue(self, job_id: str) -> dict:
        job = self.store.job(job_id)
        if job is None or job["status"] not in ("validating_files", "queued"):
            raise JobStateError(f"job {job_id} cannot be queued (status {job and job['status']})")
        if not self.layout.config_path(job_id).is_file():
            raise JobStateError(f"job {job_id} has no config.yaml; write it before enqueue")
        if job["status"] == "validating_files":
            names = ", ".join(f for f in (job["training_file"], job["validation_file"]) if f)
            self.store.add_event(job_id, f"Validating training file: {names}")
        else:
            self.store.add_event(job_id, "Job queued")
        self._wake.set()
        return self.store.job(job_id)

    def cancel(self, job_id: str, wait_s: float = 10.0) -> dict | None:
        with self._lock:
            job = self.store.job(job_id)
            if job is None or job["status"] in TERMINAL:
                return job
            child = self._jobs.get(job_id)
            if child is None:
                self.store.set_status(job_id, "cancelled", "Job cancelled", pid=None, control=None,
                                      estimated_finish=None)
                return self.store.job(job_id)
            self.store.update_job(job_id, control="cancel")
            self.store.add_event(job_id, "Cancelling the job: stopping its training process")
            self._terminate(child)
        child.done.wait(wait_s)
        return self.store.job(job_id)

    def pause(self, job_id: str, wait_s: float = 10.0) -> dict | None:
        with self._lock:
            job = self.store.job(job_id)
            if job is None:
                return None
            child = self._jobs.get(job_id)
            if job["status"] == "queued" and child is None:
                self.store.set_status(job_id, "paused", "Job paused before it started")
                return self.store.job(job_id)
            if job["status"] == "paused":
                return job
            if child is None:
                raise JobStateError(f"job {job_id} is {job['status']}: only a queued or running job can be paused")
            self.store.update_job(job_id, control="pause")
            self.store.add_event(job_id, "Pausing the job: stopping its training process (checkpoints are kept)")
            self._terminate(child)
        child.done.wait(wait_s)
        return self.store.job(job_id)

    def resume(self, job_id: str) -> dict | None:
        with self._lock:
            job = self.store.job(job_id)
            if job is None or job["status"] in ("queued", "running", "validating_files"):
                return job
            if job["status"] != "paused":
                raise JobStateError(f"job {job_id} is {job['status']}: only a paused job can be resumed")
            self.store.set_status(job_id, "queued", "Job resumed: queued", resume=1, control=None)
        self._wake.set()
        return self.store.job(job_id)

    def submit_task(self, job_id: str, kind: str, argv: list[str], out_dir: str | Path,
                    task_id: str | None = None) -> dict:
        """`tunesmith <argv...>` for the job, one task at a time, beside (not counted in) the trainings."""
        if kind not in TASK_KINDS:
            raise ValueError(f"task kind {kind!r}: choose one of {', '.join(TASK_KINDS)}")
        task_id = task_id or new_id("task")
        self.layout.task_log(job_id, task_id)  # checks both ids
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        row = self.store.add_task(id=task_id, job_id=job_id, kind=kind, status="queued",
                                  args={"argv": [str(a) for a in argv], "out_dir": str(out_dir)})
        self._wake.set()
        return row

    def cancel_task(self, task_id: str) -> dict | None:
        with self._lock:
            task = self.store.task(task_id)
            if task is None or task["status"] not in ("queued", "running"):
                return task
            child = self._tasks.get(task_id)
            if child is None:
                self.store.update_task(task_id, status="cancelled", finished_at=now(), error="cancelled")
            else:
                child.cancelled = True
                self._terminate(child)
        return self.store.task(task_id)

    def wait(self, job_id: str, statuses=TERMINAL, timeout: float = 600.0) -> dict:
        """Block until the job's status is one of `statuses` (tests, scripts); TimeoutError else."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.store.job(job_id)
            if job is not None and job["status"] in statuses:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job and job['status']} after {timeout:.0f} s")
            time.sleep(0.1)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    # ------------------------------------------------------------------ the runner thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad row must not end the thread (its children would get PDEATHSIG)
                traceback.print_exc(file=sys.stderr)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    @staticmethod
    def _terminate(child: _Child) -> None:
        signal_group(child.proc.pid, signal.SIGTERM)
        child.signalled = child.signalled or time.monotonic()

    def _escalate(self) -> None:
        """A child that has not stopped STOP_WAIT_S after its SIGTERM (hung in a library call) is
        killed: the checkpoints it wrote stay, so a paused job still resumes from them."""
        with self._lock:
            for child in [*self._jobs.values(), *self._tasks.values()]:
                if child.signalled and time.monotonic() - child.signalled > STOP_WAIT_S and child.proc.poll() is None:
                    signal_group(child.proc.pid, signal.SIGKILL)

    def tick(self) -> None:
        self._check_files()
        self._escalate()
        self._reap()
        for job_id in list(self._jobs):
            events.ingest(self.ctx, job_id)
        self._start_jobs()
        self._start_tasks()

    def _check_files(self) -> None:
        for job in self.store.jobs(statuses=["validating_files"]):
            bad, waiting = None, False
            for param in ("training_file", "validation_file"):
                file_id = job[param]
                row = self.store.file(file_id) if file_id else {"status": "processed"}
                if row is None:
                    bad = (param, f"{param} {file_id} was deleted before the job could start")
                elif row["status"] == "error":
                    bad = (param, f"{param} {file_id} is invalid: {row['status_details'] or 'its audit failed'}")
                elif row["status"] != "processed":
                    waiting = True
                if bad:
                    break
            with self._lock:
                if self.store.job(job["id"])["status"] != "validating_files":
                    continue  # cancelled meanwhile
                if bad:
                    self.store.set_status(job["id"], "failed", bad[1], level="error",
                                          error={"code": "invalid_file", "message": bad[1], "param": bad[0]})
                elif not waiting:
                    self.store.set_status(job["id"], "queued", "Files validated, moving job to queued state")

    def _limit(self) -> int:
        return self.ctx.limits.concurrency or len(self._gpus or ()) or 1

    @staticmethod
    def _visible_gpus() -> list[str]:
        import torch  # lazily: only the runner needs to know

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return (named or [str(i) for i in range(count)])[:count]

    def _free_gpu(self) -> str | None:
        if not self._gpus:
            return None
        used = [c.gpu for c in self._jobs.values()]
        return min(self._gpus, key=used.count)  # one per GPU; beyond that (concurrency > GPUs), share

    def _resumable(self, job_id: str) -> tuple[Path, int] | None:
        from tunesmith.training.checkpoint import checkpoint_dirs
        from tunesmith.training.rundir import resumable

        try:
            staging = resumable(self.layout.runs_dir(job_id), RUN_NAME)
        except ConfigError:  # nothing to resume: no checkpoint was written yet
            return None
        return staging, int(checkpoint_dirs(staging / "checkpoints")[-1].name.split("-")[1])

    def _start_jobs(self) -> None:
        for job in self.store.jobs(statuses=["queued"]):
            if len(self._jobs) >= self._limit():
                return
            self._start_job(job["id"])

    def _start_job(self, job_id: str) -> None:
        with self._lock:
            job = self.store.job(job_id)
            if job is None or job["status"] != "queued":
                return
            config = self.layout.config_path(job_id)
            found = self._resumable(job_id)
            argv = ["train", str(config), *(["--resume"] if found else [])]
            attempt = job["attempts"] + 1
            what = f"resuming from checkpoint step {found[1]}" if found else "from the start"
            gpu = self._free_gpu()
            try:
                proc = spawn(argv, self.layout.log_path(job_id),
                                   f"attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}, {what}: "
                                   f"tunesmith {' '.join(argv)}" + (f" (CUDA_VISIBLE_DEVICES={gpu})" if gpu else ""),
                                   self.layout.job_dir(job_id), gpu)
            except OSError as exc:
                message = f"could not start the training process: {exc}"
                self.store.set_status(job_id, "failed", message, level="error",
                                      error={"code": "training_failed", "message": message, "param": None})
                return
            self._jobs[job_id] = _Child(job_id, proc, gpu=gpu)
            message = ("Fine-tuning job started" if attempt == 1 and not found else
                       f"Fine-tuning job resumed from checkpoint step {found[1]} (attempt {attempt})" if found else
                       f"Fine-tuning job started again from the beginning: no checkpoint yet (attempt {attempt})")
            self.store.set_status(job_id, "running", message, pid=proc.pid, attempts=attempt, control=None,
                                  started_at=job["started_at"] or now(), estimated_finish=None,
                                  # lines the dead attempt wrote up to its checkpoint may not have been read
                                  # yet (the server died first): never skip past what was read
                                  metrics_offset=min(job["metrics_offset"] or 0, events.resume_offset(*found))
                                  if found else 0)

    def _reap(self) -> None:
        reaped = False
        with self._lock:
            for job_id, child in list(self._jobs.items()):
                code = child.proc.poll()
                if code is None:
                    continue
                events.ingest(self.ctx, job_id, final=True)  # the last lines
                self._settle(job_id, code)
                del self._jobs[job_id]
                child.done.set()
                reaped = True
            for task_id, child in list(self._tasks.items()):
                code = child.proc.poll()
                if code is None:
                    continue
                log = self.layout.task_log(child.job_id, task_id)
                status = "succeeded" if code == 0 else "cancelled" if child.cancelled else "failed"
                self.store.update_task(task_id, status=status, finished_at=now(), pid=None,
                                       error=None if code == 0 else "cancelled" if child.cancelled else last_error(log))
                del self._tasks[task_id]
                child.done.set()
                reaped = True
        if reaped:
            self._wake.set()  # a place is free: start the next one without waiting a poll

    def _finished(self, job_id: str) -> bool:
        """Succeeded when the run directory is there (whatever stopped it after that)."""
        run = self.layout.run_dir(job_id)
        if not (run / "manifest.json").is_file():
            return False
        events.ingest(self.ctx, job_id, final=True)
        job = self.store.job(job_id)
        manifest = json.loads((run / "manifest.json").read_text())
        name = fine_tuned_model_name(self.ctx.base_name, job["suffix"], job_id)
        self.store.add_event(job_id, f"New fine-tuned model created: {name}")
        self.store.set_status(job_id, "succeeded", "The job has successfully completed", fine_tuned_model=name,
                              trained_tokens=manifest.get("trained_tokens"), pid=None, control=None,
                              estimated_finish=None)
        return True

    def _settle(self, job_id: str, code: int | None) -> None:
        """The outcome of a process that ended (code None: it ended while no server watched)."""
        if code == 0 and self._finished(job_id):
            return
        job = self.store.job(job_id)
        common = {"pid": None, "control": None, "estimated_finish": None}
        if job["control"] == "cancel":
            self.store.set_status(job_id, "cancelled", "Job cancelled", **common)
        elif job["control"] == "pause":
            found = self._resumable(job_id)
            where = (f"resume continues from checkpoint step {found[1]}" if found else
                     "no checkpoint was written yet: resume starts it again")
            self.store.set_status(job_id, "paused", f"Job paused; {where}", resume=1, **common)
        elif code in INTERRUPTED and job["attempts"] < MAX_ATTEMPTS:
            # stopped by someone else than this runner (a service manager stopping the whole
            # group before the server's close()): not the job's fault, resume it
            self.store.set_status(job_id, "queued", "The training process was stopped from outside (a signal): "
                                  "queued again, to resume from its last checkpoint", resume=1, **common)
        else:
            message = (self._public(last_error(self.layout.log_path(job_id))) if code != 0 else
                       "the training process exited without writing its run directory")
            self.store.set_status(job_id, "failed", f"Fine-tuning job failed: {message}", level="error",
                                  error={"code": "training_failed", "message": message, "param": None}, **common)

    def _public(self, message: str) -> str:
        """A log's message as the API shows it: an uploaded file by its id and line, never by its
        server path; other paths under the jobs folder relative to it (the log keeps them whole)."""
        files = re.escape(str(self.layout.root / "files")) + r"/(file-[0-9a-f]{24})\.jsonl(?::(\d+))?"
        message = re.sub(files, lambda m: m[1] + (f" line {m[2]}" if m[2] else ""), message)
        return message.replace(str(self.layout.root) + os.sep, "")

    def _start_tasks(self) -> None:
        with self._lock:
            if self._tasks:
                return
            queued = self.store.tasks(statuses=["queued"])
            if not queued:
                return
            task = queued[0]
            job_id, task_id = task["job_id"], task["id"]
            argv = task["args"]["argv"]
            try:
                proc = spawn(argv, self.layout.task_log(job_id, task_id),
                                   f"task {task['kind']} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                                   f"tunesmith {' '.join(argv)}", self.layout.job_dir(job_id), self._free_gpu())
            except OSError as exc:
                self.store.update_task(task_id, status="failed", finished_at=now(), error=f"could not start: {exc}")
                return
            self._tasks[task_id] = _Child(task_id, proc, job_id=job_id)
            self.store.update_task(task_id, status="running", pid=proc.pid)
