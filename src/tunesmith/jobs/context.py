"""What every part of the jobs service is handed: the store, the folder layout, the runner, the
served base, and the limits. Built once by `tunesmith serve --jobs` (jobs/service.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.jobs.layout import Layout
from tunesmith.jobs.store import JobStore

MB = 1 << 20


@dataclass
class JobsLimits:
    max_upload_bytes: int = 512 * MB   # one uploaded file (--max-upload-mb)
    max_files: int = 1000              # files kept at once
    concurrency: int | None = None     # jobs training at once; None: 1 on CPU, one per GPU


@dataclass
class JobsContext:
    store: JobStore
    layout: Layout
    base_name: str            # the served base's model name: the only `model` a job may fine-tune
    base_spec: str            # what model.name says in a job's config to load that base
    runner: object = None     # jobs.runner.JobRunner (set once it is built)
    auditor: object = None    # jobs.files.Auditor: the uploads' audit subprocesses (set by files.routes)
    limits: JobsLimits = field(default_factory=JobsLimits)
    api_key: str | None = None
