"""The job queue: each job a `tunesmith train` subprocess. (Interface; implemented by the runner work.)

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
                          layout.task_log; status queued -> running -> succeeded | failed.
Each loop: ingest new metrics.jsonl lines as events (events.py), reap exited processes
(exit 0 + run dir -> succeeded, with fine_tuned_model and trained_tokens; else failed with the
log's error line), start queued jobs while fewer than the concurrency limit run.
"""
