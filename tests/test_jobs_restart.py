"""kill -9 the server in the middle of a job: its training process goes with it, and a server
started again on the same folder resumes the job from its last checkpoint and finishes it with
the weights an uninterrupted run of the same config has (bit for bit). The same job is paused and
resumed over the API before the kill."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import httpx
import openai
import pytest
from safetensors.torch import load_file

from conftest import ROOT, write_jsonl
from jobs_server import Server, slowed, wait_for

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _pid(jobs, job_id: str) -> int | None:
    with sqlite3.connect(f"file:{jobs / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def _checkpoint_steps(runs) -> list[int]:
    return sorted(int(p.name.split("-")[-1]) for p in runs.glob(".run.incomplete-*/checkpoints/step-*"))


def test_a_job_survives_kill_9_of_the_server(tiny_model_dir, tmp_path):
    from tunesmith.demo.orders import make_splits

    data = write_jsonl(tmp_path / "train.jsonl", make_splits(11, {"train": 24})["train"])
    jobs = tmp_path / "jobs"
    srv = Server(tiny_model_dir, jobs, env=slowed(0.1)).start()
    try:
        h = srv.headers
        with open(data, "rb") as f:
            fid = httpx.post(srv.url + "/v1/files", headers=h, files={"file": ("train.jsonl", f)},
                             data={"purpose": "fine-tune"}, timeout=60).json()["id"]
        job = httpx.post(srv.url + "/v1/fine_tuning/jobs", headers=h, timeout=60, json={
            "model": tiny_model_dir.name, "training_file": fid, "seed": 5,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 2}}},
            "tunesmith": {"train.save_every": 8, "method.r": 4, "data.max_length": 128}}).json()
        job_id = job["id"]
        runs = jobs / "jobs" / job_id / "runs"
        first = wait_for(lambda: _checkpoint_steps(runs), 400, 0.1, "a first checkpoint")[-1]

        # pause and resume over the API first (the openai client's calls): the process stops, keeping
        # its checkpoint, and a resumed one takes over from it
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.key, max_retries=0, timeout=60)
        pid = _pid(jobs, job_id)
        client.fine_tuning.jobs.pause(job_id)
        wait_for(lambda: client.fine_tuning.jobs.retrieve(job_id).status == "paused", 120, 0.2, "the pause")
        assert not _alive(pid) and _checkpoint_steps(runs)[-1] >= first
        assert client.fine_tuning.jobs.resume(job_id).status in ("queued", "running")
        wait_for(lambda: (_checkpoint_steps(runs) or [0])[-1] > first, 400, 0.1, "a checkpoint after the resume")

        pid = _pid(jobs, job_id)
        srv.kill()
        assert not (runs / "run").exists(), "the job finished before the kill; make it longer"
        wait_for(lambda: not _alive(pid), 30, 0.1, "the training process to die with the server")
    finally:
        srv.stop()

    srv = Server(tiny_model_dir, jobs, port=srv.port).start()
    try:
        done = wait_for(lambda: (j := httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job_id}", headers=srv.headers,
                                                timeout=30).json())["status"] in ("succeeded", "failed") and j,
                        600, 1, "the resumed job")
        assert done["status"] == "succeeded", done["error"]
        log = (jobs / "jobs" / job_id / "train.log").read_text()
        attempts = log.split("=== tunesmith jobs:")[1:]
        assert len(attempts) == 3 and all("--resume" in a for a in attempts[1:])  # pause/resume, then restart
        events = httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=srv.headers,
                           timeout=30).json()["data"]
        assert any(e["message"].startswith("The server restarted while the job ran") for e in events)
        steps = sorted(e["data"]["step"] for e in events if e["type"] == "metrics")
        assert steps == list(range(1, done["total_steps"] + 1))  # every step once, none lost or doubled
    finally:
        srv.stop()

    ref = tmp_path / "ref"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "tunesmith", "train", str(jobs / "jobs" / job_id / "config.yaml"),
                    f"run.output_dir={ref}", "run.name=ref"], check=True, env=env, capture_output=True, timeout=900)
    resumed = load_file(runs / "run" / "adapter" / "adapter_model.safetensors")
    straight = load_file(ref / "ref" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in resumed:
        assert (resumed[name] == straight[name]).all(), name
