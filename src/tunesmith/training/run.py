"""What every recipe does around its training loop, in one place: open the staged run directory
(new, or adopted for --resume), save the trained weights with the tokenizer and loss plot, and the
manifest fields all runs share. Recipes keep only what is theirs."""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunesmith.atomic import write_text
from tunesmith.config import Config, dump_config
from tunesmith.errors import ConfigError
from tunesmith.methods import save_trained
from tunesmith.training.checkpoint import checkpoint_dirs
from tunesmith.training.distributed import DistributedError, barrier, broadcast, is_main, world
from tunesmith.training.logging import plot_loss, read_metrics
from tunesmith.training.manifest import now_iso, versions
from tunesmith.training.rundir import resumable, run_name, staged_name, staged_run_dir


def resume_target(cfg: Config) -> tuple[str, Path, Path]:
    """(run name, staging folder, last checkpoint) of the interrupted run to continue; its saved
    config must match this one, or the resumed run would not be the run that was started."""
    staging = resumable(Path(cfg.run.output_dir), cfg.run.name)
    name = staged_name(staging)
    saved = _comparable(yaml.safe_load((staging / "config.yaml").read_text()))
    now = cfg.model_copy(deep=True)
    now.run.name = name
    now = _comparable(now.model_dump(mode="json"))
    if saved != now:
        diff = sorted(f"{sec}.{k}" for sec, vals in saved.items() if isinstance(vals, dict)
                      for k, v in vals.items() if now.get(sec, {}).get(k) != v)
        raise ConfigError(f"--resume: the config differs from the interrupted run's ({', '.join(diff)}); "
                          f"resume with the same config ({staging / 'config.yaml'})")
    return name, staging, checkpoint_dirs(staging / "checkpoints")[-1]


def _comparable(config: dict) -> dict:
    """A run's config without what may change on --resume: how many processes run it and what
    starts them (a checkpoint resumes on any number of ranks)."""
    dist = config.get("train", {}).get("distributed")
    if isinstance(dist, dict):
        dist.pop("workers", None)
        dist.pop("launcher", None)
    return config


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint: those steps are trained again."""
    rows = [r for r in read_metrics(path) if r["step"] <= step] if path.is_file() else []
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class OpenRun:
    dir: Path                  # the staging folder, renamed to `final` when the block ends without error
    name: str
    config: Config             # as resolved (run.name filled in), as saved in config.yaml
    checkpoint: Path | None    # the checkpoint to resume from, inside `dir`
    final: Path


@contextmanager
def open_run(cfg: Config, resume: bool, prefix: str):
    """The staged run directory with config.yaml written; on --resume, the interrupted run's
    folder with its metrics cut back to the checkpoint the loop continues from.

    Under several processes rank 0 alone creates, adopts and renames the folder, and tells the
    other ranks where it is (they write only their checkpoint shards into it, on a filesystem
    every rank sees); it renames it once every rank is done."""
    resolved = cfg.model_copy(deep=True)
    if not is_main():
        told = broadcast(None)
        if told[0] == "error":
            raise DistributedError(f"rank 0 could not open the run directory: {told[1]}")
        _, name, tmp, checkpoint = told
        resolved.run.name = name
        yield OpenRun(Path(tmp), name, resolved, checkpoint and Path(checkpoint), Path(cfg.run.output_dir) / name)
        barrier()
        return
    with ExitStack() as stack:
        try:
            adopt = checkpoint = None
            if resume:
                name, adopt, checkpoint = resume_target(cfg)
            else:
                name = run_name(cfg.run.name, prefix=prefix)
            resolved.run.name = name
            tmp = stack.enter_context(staged_run_dir(cfg.run.output_dir, name, adopt=adopt))
            (tmp / "config.yaml").write_text(dump_config(resolved), encoding="utf-8")
            if checkpoint is not None:
                checkpoint = tmp / "checkpoints" / checkpoint.name  # the staging folder was renamed to this process
                truncate_metrics(tmp / "metrics.jsonl", int(checkpoint.name.split("-")[1]))
        except Exception as exc:
            broadcast(("error", str(exc)))
            raise
        broadcast(("ok", name, str(tmp), checkpoint and str(checkpoint)))
        yield OpenRun(tmp, name, resolved, checkpoint, Path(cfg.run.output_dir) / name)
        barrier()  # every rank's part is written before the folder becomes the run
    print(f"run saved: {Path(cfg.run.output_dir) / name}", flush=True)


def save_run_outputs(run: OpenRun, model, tokenizer, strategy=None) -> None:
    """The trained weights (gathered from every rank's shard first, under a sharding strategy),
    tokenizer and loss plot; written by rank 0."""
    state = strategy.trainable_state(model) if strategy is not None else None  # a collective: every rank
    if not is_main():
        return
    save_trained(model, run.config.method, run.dir, state)
    tokenizer.save_pretrained(run.dir / "tokenizer")  # includes the chat template used in training
    plot_loss(run.dir / "metrics.jsonl", run.dir / "loss.png")


def manifest_base(kind: str, run: OpenRun, resolved_model, parameters: tuple[int, int], started: str,
                  result, placement, plan: dict | None = None) -> dict:
    """The manifest fields every run has; recipes add their data and objective sections. `plan`: the
    estimate made before the run (the recipe's plan record, None when none could be made), kept
    beside what the run measured so `tunesmith runs show` and benchmarks/plan_accuracy.py can say
    how far off it was."""
    trainable, total = parameters
    peak, peak_source = result.peak_memory or (None, None)
    return {
        "kind": kind, "run_name": run.name, "versions": versions(),
        "model": resolved_model.record(),  # id, source, path, sha256 (+ repo for a hub alias)
        "method": run.config.method.name, "parameters": {"trainable": trainable, "total": total},
        "seed": run.config.train.seed, "started": started, "finished": now_iso(),
        "steps": result.steps, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
        # speed of this process: after --resume, the tokens of its own steps over its own seconds
        "train_seconds": round(result.seconds, 2), "tokens_this_process": result.tokens - result.resumed_tokens,
        "tokens_per_s": round(result.tokens_per_s, 2),
        "final_loss": result.final_loss, "best_step": result.best_step, "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from, "precision": placement.precision, "device": str(placement.device),
        "processes": world()[1], "memory_rank0": result.state_bytes,
        "plan": plan,
        "measured": {"peak_memory_bytes": peak, "peak_memory_source": peak_source,
                     "tokens_per_s": round(result.tokens_per_s, 2), "seconds": round(result.seconds, 2)},
    }


def final_evaluation(evaluated: dict, result, tcfg, evaluate) -> dict:
    """The held-out numbers at the end of a run: the loop's evaluation of the last step (`evaluated`:
    the step and metrics the recipe's evaluator last recorded), or `evaluate()` (on every process:
    evaluations are shared) when it did not run here (resumed at the end) or the best weights came back."""
    ran = evaluated.get("step") == result.steps and result.steps > 0 and not tcfg.restore_best
    return evaluated["metrics"] if ran else evaluate()
