"""Where everything of the jobs service lives under its folder. Every path is made from an id
this service generated (checked against ID_RE first), never from a name or path in a request."""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError

ID_RE = re.compile(r"^(file|ftjob|task)-[0-9a-f]{24}$")
RUN_NAME = "run"  # run.name of every job's run: jobs/<id>/runs/run


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def checked(ident: str, prefix: str) -> str:
    """The id itself when it is one this service could have made with `prefix`, else ValueError."""
    if not isinstance(ident, str) or not ID_RE.match(ident) or not ident.startswith(prefix + "-"):
        raise ValueError(f"not a {prefix} id: {ident!r}")
    return ident


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "Layout":
        root = Path(root).resolve()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--jobs {root} is a file; give a folder (it is created when missing)")
        for sub in ("files", "jobs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def db(self) -> Path:
        return self.root / "jobs.sqlite3"

    # -- files
    def file_path(self, file_id: str) -> Path:
        # .jsonl: `tunesmith data inspect` and `train` pick their reader by the suffix, and an
        # upload is accepted only once every line is a JSON object (jobs/files.py).
        return self.root / "files" / f"{checked(file_id, 'file')}.jsonl"

    def audit_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{checked(file_id, 'file')}.audit.json"

    # -- jobs
    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / checked(job_id, "ftjob")

    def config_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "config.yaml"

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "train.log"

    def runs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "runs"

    def run_dir(self, job_id: str) -> Path:
        """The finished run directory (it exists only once training has succeeded)."""
        return self.runs_dir(job_id) / RUN_NAME

    def live_run_dir(self, job_id: str) -> Path | None:
        """Where the run's files are now: the finished run directory, else the staging folder of
        the run in progress (or of an interrupted one kept for --resume), else None."""
        final = self.run_dir(job_id)
        if final.is_dir():
            return final
        staged = sorted(self.runs_dir(job_id).glob(f".{RUN_NAME}.incomplete-*"),
                        key=lambda p: p.stat().st_mtime)
        return staged[-1] if staged else None

    # -- tasks (exports, comparisons) of a job
    def task_dir(self, job_id: str, task_id: str) -> Path:
        return self.job_dir(job_id) / "tasks" / checked(task_id, "task")

    def task_log(self, job_id: str, task_id: str) -> Path:
        return self.job_dir(job_id) / "tasks" / f"{checked(task_id, 'task')}.log"
