"""Fine-tuning jobs over HTTP (OpenAI's files + fine_tuning.jobs shapes) and the web dashboard.

A client of the CLI, never of its internals (DESIGN.md): a job is a `tunesmith train` subprocess
on a generated config, an upload's audit is `tunesmith data inspect`, an export is
`tunesmith export`, a comparison is `tunesmith compare`. What they write (the run directory,
metrics.jsonl, checkpoints, compare.json) is read back from disk.

    store.py    SQLite (WAL) under the jobs folder: files, jobs, events, tasks. The one place
                that knows the schema; everything else goes through JobStore.
    layout.py   where things live under the jobs folder (by id only, never a request's path)
    spec.py     a create-job request (OpenAI shape + `tunesmith` extension) -> a validated Config
    files.py    the /v1/files routes: uploads, the audit subprocess, status details
    upload.py   one upload's body: streamed multipart under the size limit, UTF-8 / JSONL checks
    runner.py   the queue: subprocesses, concurrency, cancel / pause / resume, restart recovery
    events.py   metrics.jsonl -> events and checkpoints
    models.py   succeeded jobs as models of the serving engine (ft:<base>:<suffix>:<id>)
    api.py      the /v1/files and /v1/fine_tuning routes
    web/        the dashboard (static page + /ui routes), login and CSRF

Imports point down: api -> runner/files/spec -> store/layout; web -> api's objects; nothing in
serve/ or training/ imports jobs/.
"""
