"""Succeeded jobs as models of the serving engine: each is served at once under its
fine_tuned_model name (ft:<base>:<suffix>:<id>) as an adapter on the shared base.

JobModels stands in for serve/adapters.py's AdapterDir (the engine asks it for names() and
locate()). A name from a request is looked up in the store, never turned into a path: the
adapter is the job's own run directory under the jobs folder. Inside the engine an adapter is
keyed by its job id (PEFT adapter names cannot hold ':'), so locate() takes either.
"""
from __future__ import annotations

import json

from tunesmith.errors import ModelError
from tunesmith.jobs.context import JobsContext
from tunesmith.jobs.layout import ID_RE
from tunesmith.serve.adapters import AdapterDir, AdapterSource


class JobModels:
    def __init__(self, ctx: JobsContext, adapters: AdapterDir | None = None):
        self.ctx = ctx
        self.adapters = adapters or AdapterDir(None)  # --adapters DIR served alongside, if given

    def names(self) -> list[str]:
        return [*self.adapters.names(), *(j["fine_tuned_model"] for j in self.ctx.store.served_jobs())]

    def _job(self, name: str) -> dict | None:
        if not isinstance(name, str):
            return None
        if name.startswith("ft:"):
            return self.ctx.store.job_by_model(name)
        if ID_RE.match(name) and name.startswith("ftjob-"):
            job = self.ctx.store.job(name)
            return job if job is not None and job["status"] == "succeeded" else None
        return None

    def locate(self, name: str, known=None) -> AdapterSource:
        job = self._job(name)
        if job is None:
            if isinstance(name, str) and name.startswith(("ft:", "ftjob-")):
                raise self.unknown(name, known)
            return self.adapters.locate(name, known or self.names)
        run = self.ctx.layout.run_dir(job["id"])
        adapter, tokenizer = run / "adapter", run / "tokenizer"
        try:
            config = json.loads((adapter / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"model '{job['fine_tuned_model']}': its adapter cannot be read ({type(exc).__name__}); "
                             "see the job's log") from exc
        return AdapterSource(job["id"], adapter, tokenizer if (tokenizer / "tokenizer_config.json").is_file()
                             else None, config)

    def unknown(self, name, known=None) -> ModelError:
        names = known() if known is not None else self.names()
        return ModelError(f"unknown model '{name}'; available: {', '.join(names) or '(none)'}")
