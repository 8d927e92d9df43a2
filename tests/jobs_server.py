"""A real `tunesmith serve MODEL --jobs DIR` in a subprocess, for the jobs tests (the openai client,
the restart test, the browser test): started on a free loopback port, waited for, stopped."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import ROOT
from serve_fake import free_port

KEY = "jobs-test-key"
HOOKS = Path(__file__).parent / "jobs_hooks"


def slowed(seconds: float) -> dict:
    """Environment for a server whose trainings sleep after each logged step (tests/jobs_hooks), so
    that a pause, cancel or kill lands mid-run on any machine; the weights are unchanged."""
    return {"PYTHONPATH": str(HOOKS), "TUNESMITH_TEST_STEP_DELAY": str(seconds)}


class Server:
    def __init__(self, model: Path, jobs: Path, key: str | None = KEY, port: int | None = None,
                 extra: tuple[str, ...] = (), env: dict | None = None):
        self.model, self.jobs, self.key = model, jobs, key
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra, self.env = extra, dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = jobs.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 180) -> "Server":
        paths = [*self.env.pop("PYTHONPATH", "").split(os.pathsep), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        if self.key:
            env["TUNESMITH_API_KEY"] = self.key
        cmd = [sys.executable, "-m", "tunesmith", "serve", str(self.model), "--jobs", str(self.jobs),
               "--port", str(self.port), *self.extra]
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if not self._out.closed:
            self._out.close()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(fn, timeout: float = 300, every: float = 0.5, what: str = "condition"):
    """fn() until it returns something truthy (returned), or AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
