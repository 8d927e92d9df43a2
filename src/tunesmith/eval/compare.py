"""`tunesmith compare`: a base and a tuned model on the same tasks — deltas, forgetting, gates,
and the examples where the two disagree.

Delta convention. Every delta is "improvement in points", positive when the tuned model is better:
  - rates (higher-is-better metrics whose values lie in [0, 1]: accuracy, exact_match ...) are
    compared in percentage points: (tuned - base) x 100, unit "pp";
  - lower-is-better metrics (perplexity, loss, nll, bits_per_byte) in percent of the base value with
    the sign flipped: (base - tuned) / base x 100, unit "%" — a perplexity going 10 -> 9 is +10;
  - other higher-is-better metrics (values above 1) in percent of the base: (tuned - base) / |base| x 100.
A base value of 0 (no relative change defined) falls back to the plain difference, unit "abs".
Deltas are rounded to 9 decimals so that a drop of exactly the threshold (0.50 -> 0.48) is not
flagged by float noise. Gates (`TASK/METRIC: MIN`) and the forgetting threshold use these numbers.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith.config import EvalTaskSection
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.eval.results import TaskResult, higher_is_better, read_results

SOURCE_FILE = ".compare-source.json"  # beside each side's results: which model and task settings made them
CHANGE_ORDER = {"regressed": 0, "improved": 1, "changed": 2}


def _log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class MetricDelta:
    metric: str
    base: float | None
    tuned: float | None
    delta: float | None         # improvement in points (see the module docstring)
    unit: str                   # pp | % | abs | "" (missing on one side)


@dataclass
class TaskComparison:
    task: str
    kind: str
    role: str
    primary: str
    base: dict[str, float]
    tuned: dict[str, float]
    deltas: list[MetricDelta]
    forgetting: bool
    diffs: list[dict]           # per-example disagreements, regressions first
    counts: dict[str, int]      # paired, only_base, only_tuned, improved, regressed, changed
    speed: dict[str, dict] = field(default_factory=dict)  # base / tuned -> the result's speed (examples_per_s ...)

    def delta(self, metric: str) -> MetricDelta | None:
        return next((d for d in self.deltas if d.metric == metric), None)


@dataclass
class GateResult:
    gate: str
    minimum: float
    delta: float | None
    unit: str
    passed: bool


@dataclass
class Comparison:
    base: str
    tuned: str
    threshold: float
    tasks: list[TaskComparison]
    gates: list[GateResult] = field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def forgetting(self) -> list[str]:
        return [t.task for t in self.tasks if t.forgetting]

    def to_json(self) -> dict:
        return {**asdict(self), "gates_passed": self.gates_passed, "forgetting": self.forgetting}


# ---- command-line values -------------------------------------------------------------------------

def parse_gate_flag(s: str) -> tuple[str, float]:
    """`TASK/METRIC=MIN` -> ("TASK/METRIC", MIN); MIN in points, negative allows a drop."""
    key, eq, raw = s.rpartition("=")
    try:
        value = float(raw)
    except ValueError:
        value = None
    if not eq or value is None or "/" not in key:
        raise ConfigError(f"--gate '{s}': expected TASK/METRIC=MIN, e.g. banking77/accuracy=5 "
                          "(tuned must gain at least 5 points) or general/accuracy=-1 (may drop 1 point)")
    return key.strip(), value


# ---- deltas, diffs, gates (pure: tests feed TaskResults directly) -------------------------------

def number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def metric_delta(metric: str, base, tuned) -> tuple[float | None, str]:
    """(improvement in points, unit) — positive means the tuned model is better."""
    b, t = number(base), number(tuned)
    if b is None or t is None:
        return None, ""
    better_up = higher_is_better(metric)
    if better_up and 0 <= b <= 1 and 0 <= t <= 1:
        return round((t - b) * 100, 9), "pp"
    if b == 0:
        return round(t - b if better_up else b - t, 9), "abs"
    change = (t - b) / abs(b) * 100
    return round(change if better_up else -change, 9), "%"


def example_diffs(task: str, base: TaskResult, tuned: TaskResult) -> tuple[list[dict], dict[str, int]]:
    """Rows paired by id where the two models differ in score or in prediction."""
    def by_id(result: TaskResult, side: str) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for i, row in enumerate(result.examples):
            key = str(row.get("id", i))  # rows without an id pair by position
            if key in rows:
                raise TunesmithError(f"task '{task}': example id {key!r} appears twice in the {side} results; "
                                     "ids must be unique to pair the two models' rows")
            rows[key] = row
        return rows

    b, t = by_id(base, "base"), by_id(tuned, "tuned")
    diffs = []
    for key, rb in b.items():
        rt = t.get(key)
        if rt is None:
            continue
        sb, st = number(rb.get("score")), number(rt.get("score"))
        if sb == st and rb.get("prediction") == rt.get("prediction"):
            continue
        change = "changed" if sb is None or st is None or sb == st else ("improved" if st > sb else "regressed")
        diffs.append({"id": rb.get("id", key), "input": rb.get("input"), "reference": rb.get("reference"),
                      "base": rb.get("prediction"), "tuned": rt.get("prediction"),
                      "base_score": sb, "tuned_score": st, "change": change})
    diffs.sort(key=lambda d: CHANGE_ORDER[d["change"]])  # stable: file order within each kind
    counts = {"paired": len(b.keys() & t.keys()), "only_base": len(b.keys() - t.keys()),
              "only_tuned": len(t.keys() - b.keys()),
              **{c: sum(d["change"] == c for d in diffs) for c in CHANGE_ORDER}}
    return diffs, counts


def compare_task(task: EvalTaskSection, base: TaskResult, tuned: TaskResult, threshold: float) -> TaskComparison:
    names = list(dict.fromkeys([*base.metrics, *tuned.metrics]))
    deltas = [MetricDelta(m, base.metrics.get(m), tuned.metrics.get(m), *metric_delta(
        m, base.metrics.get(m), tuned.metrics.get(m))) for m in names]
    primary = tuned.primary or base.primary
    p = next((d for d in deltas if d.metric == primary), None)
    # "drops by more than threshold": a drop of exactly the threshold is still allowed.
    forgetting = task.role == "general" and p is not None and p.delta is not None and p.delta < -threshold
    diffs, counts = example_diffs(task.name, base, tuned)
    return TaskComparison(task.name, tuned.kind, task.role, primary, dict(base.metrics), dict(tuned.metrics),
                          deltas, forgetting, diffs, counts, {"base": dict(base.speed), "tuned": dict(tuned.speed)})


def check_task_gates(gates: dict[str, float], task_names: list[str]) -> None:
    """Before anything runs: every gate names one of the tasks (metrics are known only after)."""
    for key in gates:
        name, _, metric = key.partition("/")
        if not metric:
            raise ConfigError(f"gate '{key}': expected TASK/METRIC, e.g. {task_names[0] if task_names else 'qa'}"
                              "/accuracy")
        if name not in task_names:
            raise ConfigError(f"gate '{key}': no task named '{name}'; tasks: {', '.join(task_names) or '(none)'}")


def evaluate_gates(gates: dict[str, float], tasks: list[TaskComparison]) -> list[GateResult]:
    by_name = {t.task: t for t in tasks}
    check_task_gates(gates, list(by_name))
    out = []
    for key, minimum in gates.items():
        name, _, metric = key.partition("/")
        d = by_name[name].delta(metric)
        if d is None:
            raise ConfigError(f"gate '{key}': task '{name}' has no metric '{metric}'; its metrics: "
                              f"{', '.join(x.metric for x in by_name[name].deltas) or '(none)'}")
        passed = d.delta is not None and not math.isnan(d.delta) and d.delta >= minimum
        out.append(GateResult(key, float(minimum), d.delta, d.unit, passed))
    return out


def compare_results(base: dict[str, TaskResult], tuned: dict[str, TaskResult], tasks: list[EvalTaskSection],
                    threshold: float = 2.0, gates: dict[str, float] | None = None,
                    base_label: str = "base", tuned_label: str = "tuned") -> Comparison:
    rows = []
    for task in tasks:
        missing = [side for side, res in (("base", base), ("tuned", tuned)) if task.name not in res]
        if missing:
            raise TunesmithError(f"task '{task.name}': no {' or '.join(missing)} result was produced")
        rows.append(compare_task(task, base[task.name], tuned[task.name], threshold))
    return Comparison(base_label, tuned_label, threshold, rows, evaluate_gates(gates or {}, rows))


# ---- running both models, with --reuse -----------------------------------------------------------

def run_tasks(spec, tasks, out_dir, adapter=True) -> dict[str, TaskResult]:
    """The one door to the evaluators (tests replace it)."""
    from tunesmith.eval.run import run_tasks as _run

    return _run(spec, tasks, out_dir, adapter=adapter)


def _model_source(spec, adapter: bool) -> dict:
    """What identifies the evaluated model; a run directory also by its manifest (retrained in place)."""
    source = {"spec": str(spec), "adapter": adapter}
    manifest = Path(spec) / "manifest.json"
    if manifest.is_file():
        source["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return source


def _read_source(side_dir: Path) -> dict:
    try:
        data = json.loads((side_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_source(side_dir: Path, model: dict, tasks: dict) -> None:
    from tunesmith.atomic import write_json

    write_json(side_dir / SOURCE_FILE, {"model": model, "tasks": tasks})


def _file_sha256(path: str | None) -> str | None:
    p = Path(path) if path else None
    return hashlib.sha256(p.read_bytes()).hexdigest() if p is not None and p.is_file() else None


def _task_record(t: EvalTaskSection) -> dict:
    """A task's settings and its data files' contents: an edited test file must not be reused."""
    return {**t.model_dump(mode="json"), "path_sha256": _file_sha256(t.path),
            "shots_path_sha256": _file_sha256(t.shots_path)}


def evaluate_side(spec, tasks: list[EvalTaskSection], side_dir: Path, adapter: bool = True,
                  reuse: bool = False, log=_log) -> dict[str, TaskResult]:
    """Results of `tasks` for one model in side_dir; with reuse, a task whose stored result was made by
    the same model with the same task settings and data is read back instead of run again."""
    side_dir = Path(side_dir)
    model = _model_source(spec, adapter)
    stored = _read_source(side_dir)
    known = dict(stored.get("tasks", {})) if stored.get("model") == model else {}
    records = {t.name: _task_record(t) for t in tasks}
    existing = read_results(side_dir) if reuse and side_dir.is_dir() else {}
    kept = {n: existing[n] for n in records if n in existing and known.get(n) == records[n]}
    todo = [t for t in tasks if t.name not in kept]
    for name in kept:
        log(f"  reusing {side_dir / name}.json")
    if todo:
        # Forget the tasks about to run first: a crash midway must not leave a new file under old settings.
        known = {k: v for k, v in known.items() if k not in {t.name for t in todo}}
        side_dir.mkdir(parents=True, exist_ok=True)
        _write_source(side_dir, model, known)
        fresh = run_tasks(spec, todo, side_dir, adapter=adapter)
        _write_source(side_dir, model, {**known, **{n: records[n] for n in fresh if n in records}})
        kept.update(fresh)
    return kept


def compare(base_spec, tuned_spec, tasks: list[EvalTaskSection], out_dir, threshold: float = 2.0,
            gates: dict[str, float] | None = None, reuse: bool = False, base_adapter: bool = True,
            log=_log) -> Comparison:
    """Evaluate both models on the same tasks (out_dir/base/, out_dir/tuned/), compare, and write
    out_dir/compare.json. base_adapter=False evaluates a run directory's base model."""
    from tunesmith.atomic import write_json

    if not tasks:
        raise ConfigError("compare: no tasks; list them under eval.tasks in the config or pass "
                          "--task NAME=KIND:PATH")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"compare: task names must be unique; repeated: {', '.join(dupes)}")
    check_task_gates(gates or {}, names)
    out_dir = Path(out_dir)
    results = {}
    for side, spec, adapter in (("base", base_spec, base_adapter), ("tuned", tuned_spec, True)):
        log(f"evaluating {side}: {spec}{'' if adapter else ' (base model, no adapter)'}")
        results[side] = evaluate_side(spec, tasks, out_dir / side, adapter=adapter, reuse=reuse, log=log)
    label = f"{base_spec}{'' if base_adapter else ' (base)'}"
    comparison = compare_results(results["base"], results["tuned"], tasks, threshold, gates, label, str(tuned_spec))
    write_json(out_dir / "compare.json", comparison.to_json())
    return comparison


# ---- the command: where tasks, thresholds and gates come from ------------------------------------

def _settings_config(config: str | None, tuned: str, task_flags: list[str]):
    """--config; else, when no --task is given, the tuned run's own config.yaml; else nothing
    (explicit --task flags are never mixed with tasks the user did not name)."""
    import yaml

    from tunesmith.config import load_config, parse_config

    if config:
        return load_config(config)
    run_cfg = Path(tuned) / "config.yaml"
    if not task_flags and run_cfg.is_file():
        return parse_config(yaml.safe_load(run_cfg.read_text(encoding="utf-8")), str(run_cfg))
    return None


def parse_task_flag(flag: str) -> EvalTaskSection:
    """`--task NAME=KIND:PATH`, parsed as `tunesmith eval` parses it."""
    from tunesmith.eval.run import parse_task_flag as parse

    return parse(flag)


def resolve_plan(config: str | None, tuned: str, task_flags: list[str], gate_flags: list[str],
                 threshold: float | None) -> tuple[list[EvalTaskSection], float, dict[str, float]]:
    cfg = _settings_config(config, tuned, task_flags)
    tasks = {t.name: t for t in (cfg.eval.tasks if cfg else [])}
    for flag in task_flags:
        t = parse_task_flag(flag)
        tasks[t.name] = t  # a flag replaces the config's task of the same name
    gates = {**(cfg.eval.gates if cfg else {}), **dict(parse_gate_flag(g) for g in gate_flags)}
    if threshold is None:
        threshold = cfg.eval.forgetting_threshold if cfg else 2.0
    if threshold < 0:
        raise ConfigError(f"--threshold {threshold:g}: must be >= 0 (points a general task may drop)")
    return list(tasks.values()), float(threshold), gates


def run_compare(models: list[str], config: str | None = None, task_flags: list[str] = (), out: str | None = None,
                threshold: float | None = None, gate_flags: list[str] = (), html: str | None = None,
                reuse: bool = False, fail_on_forgetting: bool = False) -> int:
    """`tunesmith compare BASE TUNED` (or `compare RUN`: the run's base model against the run)."""
    from tunesmith.eval.report import format_table, write_html
    from tunesmith.generation import is_run_dir

    if len(models) == 1:
        if not is_run_dir(models[0]):
            raise ConfigError(f"compare {models[0]}: with one model it must be a finished run directory (its base "
                              "model is compared with it); otherwise give two: compare BASE TUNED")
        base, tuned, base_adapter = models[0], models[0], False
    elif len(models) == 2:
        (base, tuned), base_adapter = models, True
    else:
        raise ConfigError(f"compare takes BASE TUNED (or one run directory), got {len(models)} models")
    tasks, threshold, gates = resolve_plan(config, tuned, list(task_flags), list(gate_flags), threshold)
    out_dir = Path(out) if out else (Path(tuned) / "eval" / "compare" if is_run_dir(tuned) else Path("compare"))
    c = compare(base, tuned, tasks, out_dir, threshold, gates, reuse=reuse, base_adapter=base_adapter)
    html_path = write_html(c, Path(html) if html else out_dir / "compare.html")
    print("\n" + format_table(c))
    print(f"\nsaved {out_dir / 'compare.json'} and {html_path}")
    return 0 if c.gates_passed and not (fail_on_forgetting and c.forgetting) else 1
