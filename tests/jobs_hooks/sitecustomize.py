"""Test-only (tests/test_jobs_runner.py puts this folder on PYTHONPATH of the trainings its runner
starts): TUNESMITH_TEST_STEP_DELAY=SECONDS sleeps after every logged step, so that a pause, a cancel
or a kill lands mid-run on any machine. The sleep touches no weight, data order or random state:
a slowed run trains exactly as an unslowed one."""
import os

_DELAY = float(os.environ.get("TUNESMITH_TEST_STEP_DELAY") or 0)

if _DELAY > 0:
    import time

    from tunesmith.training import logging as _logging

    _progress = _logging.MetricsLogger.progress

    def _slow_progress(self, *args, **kwargs):
        record = _progress(self, *args, **kwargs)
        time.sleep(_DELAY)
        return record

    _logging.MetricsLogger.progress = _slow_progress
