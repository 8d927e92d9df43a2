"""The jobs service's state: one SQLite database (WAL, so readers never wait on the runner's
writes) under the jobs folder. It survives a server restart; the files it points at are under
the same folder (layout.py).

Rows come back as plain dicts; JSON columns (names ending in _json) are decoded into the key
without the suffix. One connection guarded by a lock: the server's request threads, the runner
thread and the SSE streams all share it, and every statement is short.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL, status TEXT NOT NULL, status_details TEXT, audit_json TEXT,
  deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
  method_json TEXT NOT NULL, hyperparameters_json TEXT NOT NULL, tunesmith_json TEXT,
  training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL,
  metadata_json TEXT, fine_tuned_model TEXT, started_at INTEGER, finished_at INTEGER,
  estimated_finish INTEGER, trained_tokens INTEGER, total_steps INTEGER, step INTEGER,
  error_json TEXT, pid INTEGER, resume INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  metrics_offset INTEGER NOT NULL DEFAULT 0, control TEXT, valid_step INTEGER);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL, type TEXT NOT NULL,
  message TEXT NOT NULL, data_json TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS tasks (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, kind TEXT NOT NULL, args_json TEXT NOT NULL,
  status TEXT NOT NULL, created_at INTEGER NOT NULL, finished_at INTEGER, pid INTEGER, error_json TEXT);
"""

# Job statuses (OpenAI's, plus paused). Terminal ones never change again.
JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
FILE_STATUSES = ("uploaded", "processed", "error")


def now() -> int:
    return int(time.time())


def _decode(row: sqlite3.Row | None) -> dict | None:
    if row is None:
        return None
    out = {}
    for key in row.keys():
        value = row[key]
        if key.endswith("_json"):
            out[key[:-5]] = json.loads(value) if value is not None else None
        else:
            out[key] = value
    return out


def _encode(fields: dict) -> dict:
    """{'error': {...}} -> {'error_json': '...'} for the JSON columns; other keys unchanged."""
    out = {}
    for key, value in fields.items():
        if key in _JSON_KEYS:
            out[key + "_json"] = json.dumps(value) if value is not None else None
        else:
            out[key] = value
    return out


_JSON_KEYS = {"audit", "method", "hyperparameters", "tunesmith", "metadata", "error", "data", "args"}


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ generic
    def _insert(self, table: str, fields: dict) -> None:
        fields = _encode(fields)
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(fields.values()))

    def _update(self, table: str, ident: str, fields: dict) -> None:
        if not fields:
            return
        fields = _encode(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*fields.values(), ident))

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        with self._lock:
            return _decode(self._db.execute(sql, args).fetchone())

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [_decode(r) for r in self._db.execute(sql, args).fetchall()]

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int, newest_first: bool) -> list:
        """Rows after the row with id `after` in the listing order (OpenAI's cursor pagination)."""
        order = "DESC" if newest_first else "ASC"
        if after is not None:
            anchor = self._one(f"SELECT seq FROM {table} WHERE id = ?", (after,))
            if anchor is None:
                return []
            where += f" AND seq {'<' if newest_first else '>'} ?"
            args = (*args, anchor["seq"])
        return self._all(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?", (*args, limit))

    # ------------------------------------------------------------------ files
    def add_file(self, **fields) -> dict:
        self._insert("files", {"created_at": now(), **fields})
        return self.file(fields["id"])

    def update_file(self, file_id: str, **fields) -> None:
        self._update("files", file_id, fields)

    def file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))

    def files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
              newest_first: bool = True) -> list[dict]:
        where, args = "deleted = 0", ()
        if purpose is not None:
            where, args = where + " AND purpose = ?", (purpose,)
        return self._page("files", where, args, after, limit, newest_first)

    def delete_file(self, file_id: str) -> None:
        self._update("files", file_id, {"deleted": 1})

    def jobs_using(self, file_id: str, statuses=None) -> list[dict]:
        rows = self._all("SELECT * FROM jobs WHERE training_file = ? OR validation_file = ? ORDER BY seq",
                         (file_id, file_id))
        return [r for r in rows if statuses is None or r["status"] in statuses]

    # ------------------------------------------------------------------ jobs
    def add_job(self, **fields) -> dict:
        self._insert("jobs", {"created_at": now(), **fields})
        return self.job(fields["id"])

    def update_job(self, job_id: str, **fields) -> None:
        self._update("jobs", job_id, fields)

    def set_status(self, job_id: str, status: str, message: str | None = None, level: str = "info",
                   **fields) -> None:
        """A status change, with its event (the job's history reads as one list of events)."""
        assert status in JOB_STATUSES, status
        if status in TERMINAL:
            fields.setdefault("finished_at", now())
        self.update_job(job_id, status=status, **fields)
        if message:
            self.add_event(job_id, message, level=level, data={"status": status})

    def job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def jobs(self, after: str | None = None, limit: int = 20, statuses=None) -> list[dict]:
        if statuses is not None:
            marks = ", ".join("?" for _ in statuses)
            return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", tuple(statuses))
        return self._page("jobs", "1 = 1", (), after, limit, newest_first=True)

    def job_by_model(self, fine_tuned_model: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'",
                         (fine_tuned_model,))

    def served_jobs(self) -> list[dict]:
        return self._all("SELECT * FROM jobs WHERE status = 'succeeded' AND fine_tuned_model IS NOT NULL "
                         "ORDER BY seq")

    # ------------------------------------------------------------------ events
    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None, created_at: int | None = None) -> int:
        fields = _encode({"job_id": job_id, "created_at": created_at or now(), "level": level, "type": type,
                          "message": message, "data": data})
        with self._lock:
            cur = self._db.execute("INSERT INTO events (job_id, created_at, level, type, message, data_json) "
                                   "VALUES (?, ?, ?, ?, ?, ?)", tuple(fields.values()))
            return int(cur.lastrowid)

    def events(self, job_id: str, after_seq: int | None = None, limit: int = 20) -> list[dict]:
        """Newest first (OpenAI's order); `after_seq` pages towards older events."""
        if after_seq is None:
            return self._all("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT ?", (job_id, limit))
        return self._all("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                         (job_id, after_seq, limit))

    def events_since(self, job_id: str, seq: int = 0, limit: int = 1000) -> list[dict]:
        """Oldest first, every event after `seq` (the dashboard's live stream)."""
        return self._all("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                         (job_id, seq, limit))

    # ------------------------------------------------------------------ tasks (exports, comparisons)
    def add_task(self, **fields) -> dict:
        self._insert("tasks", {"created_at": now(), **fields})
        return self.task(fields["id"])

    def update_task(self, task_id: str, **fields) -> None:
        self._update("tasks", task_id, fields)

    def task(self, task_id: str) -> dict | None:
        return self._one("SELECT * FROM tasks WHERE id = ?", (task_id,))

    def tasks(self, job_id: str | None = None, statuses=None) -> list[dict]:
        rows = (self._all("SELECT * FROM tasks WHERE job_id = ? ORDER BY seq", (job_id,)) if job_id is not None
                else self._all("SELECT * FROM tasks ORDER BY seq"))
        return [r for r in rows if statuses is None or r["status"] in statuses]
