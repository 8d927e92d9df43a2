"""Running setup work off the main thread (re-exported by serve/engine.py, where it used to live)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """fn() run on a short-lived thread, its exceptions re-raised. Multi-threaded torch work on a
    thread leaves that thread's OpenMP team alive, and with more OpenMP threads than cores libgomp
    stops spinning between parallel regions: measured on 2 cores, the scheduler thread then decodes
    ~40% slower for the rest of the process. So model loading (a GGUF's dequantisation) and any
    other computing a serving process does besides the scheduler's go through here."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = exc
    t = threading.Thread(target=run, name="tunesmith-setup")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
