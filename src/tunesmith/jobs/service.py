"""`tunesmith serve --jobs DIR`: the jobs API and the dashboard on the serving app.

JobsService is the add-on serve/app.py's serve() takes (it imports nothing from here): it opens
the store under DIR, serves succeeded jobs as models (models.py), adds the routes (files.py,
api.py, web/), and starts / stops the runner with the server.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.jobs.context import MB, JobsContext, JobsLimits
from tunesmith.jobs.layout import Layout
from tunesmith.jobs.store import JobStore

log = logging.getLogger("tunesmith.jobs")


def base_spec_of(model_spec: str | Path) -> str:
    """What a job's config says as model.name to load the served base: an absolute path for a
    local directory or file (the training subprocess may start elsewhere), else the alias / hub id."""
    from tunesmith.generation import is_run_dir

    path = Path(model_spec)
    if path.exists():
        if is_run_dir(path):
            raise ConfigError(f"--jobs: {model_spec} is a run directory; serve its base model (jobs fine-tune the "
                              "base, and serve each result as an adapter on it)")
        return str(path.resolve())
    return str(model_spec)


class JobsService:
    def __init__(self, jobs_dir: str | Path, model_spec: str | Path, base_name: str,
                 limits: JobsLimits | None = None):
        layout = Layout.create(jobs_dir)
        self.ctx = JobsContext(store=JobStore(layout.db), layout=layout, base_name=base_name,
                               base_spec=base_spec_of(model_spec), limits=limits or JobsLimits())
        from tunesmith.jobs.runner import JobRunner

        self.ctx.runner = JobRunner(self.ctx)

    # -- serve()'s add-on interface
    def adapters(self, adapters_dir):
        from tunesmith.jobs.models import JobModels
        from tunesmith.serve.adapters import AdapterDir

        return JobModels(self.ctx, AdapterDir(adapters_dir) if adapters_dir is not None else None)

    def guard(self, api_key: str | None) -> dict:
        from tunesmith.jobs import files, web

        self.ctx.api_key = api_key
        return {"body_limits": files.body_limits(self.ctx), **web.guard_options(self.ctx)}

    def install(self, app, engine) -> None:
        from tunesmith.jobs import api, files, web

        files.routes(app, self.ctx)
        api.routes(app, self.ctx)
        web.routes(app, self.ctx)

    def start(self) -> None:
        self.ctx.runner.start()
        log.info("jobs: %s (dashboard at /)", self.ctx.layout.root)

    def close(self) -> None:
        try:
            self.ctx.runner.close()
            if self.ctx.auditor is not None:
                self.ctx.auditor.close()  # an audit stopped here stays `uploaded` and runs again next start
        finally:
            self.ctx.store.close()


def jobs_limits(max_upload_mb: float, concurrency: int | None) -> JobsLimits:
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive (got {max_upload_mb})")
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"--max-jobs must be at least 1 (got {concurrency})")
    return JobsLimits(max_upload_bytes=int(max_upload_mb * MB), concurrency=concurrency)
