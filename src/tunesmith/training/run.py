"""What every recipe does around its training loop, in one place: open the staged run directory
(new, or adopted for --resume), save the trained weights with the tokenizer and loss plot, and the
manifest fields all runs share. Recipes keep only what is theirs."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunesmith.atomic import write_text
from tunesmith.config import Config, dump_config
from tunesmith.errors import ConfigError
from tunesmith.methods import save_trained
from tunesmith.training.checkpoint import checkpoint_dirs
from tunesmith.training.logging import plot_loss, read_metrics
from tunesmith.training.manifest import now_iso, versions
from tunesmith.training.rundir import resumable, run_name, staged_name, staged_run_dir


def resume_target(cfg: Config) -> tuple[str, Path, Path]:
    """(run name, staging folder, last checkpoint) of the interrupted run to continue; its saved
    config must match this one, or the resumed run would not be the run that was started."""
    staging = resumable(Path(cfg.run.output_dir), cfg.run.name)
    name = staged_name(staging)
    saved = yaml.safe_load((staging / "config.yaml").read_text())
    now = cfg.model_copy(deep=True)
    now.run.name = name
    if saved != now.model_dump(mode="json"):
        diff = sorted(f"{sec}.{k}" for sec, vals in saved.items() if isinstance(vals, dict)
                      for k, v in vals.items() if now.model_dump(mode="json").get(sec, {}).get(k) != v)
        raise ConfigError(f"--resume: the config differs from the interrupted run's ({', '.join(diff)}); "
                          f"resume with the same config ({staging / 'config.yaml'})")
    return name, staging, checkpoint_dirs(staging / "checkpoints")[-1]


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
    folder with its metrics cut back to the checkpoint the loop continues from."""
    adopt = checkpoint = None
    if resume:
        name, adopt, checkpoint = resume_target(cfg)
    else:
        name = run_name(cfg.run.name, prefix=prefix)
    resolved = cfg.model_copy(deep=True)
    resolved.run.name = name
    with staged_run_dir(cfg.run.output_dir, name, adopt=adopt) as tmp:
        (tmp / "config.yaml").write_text(dump_config(resolved), encoding="utf-8")
        if checkpoint is not None:
            checkpoint = tmp / "checkpoints" / checkpoint.name  # the staging folder was renamed to this process
            truncate_metrics(tmp / "metrics.jsonl", int(checkpoint.name.split("-")[1]))
        yield OpenRun(tmp, name, resolved, checkpoint, Path(cfg.run.output_dir) / name)
    print(f"run saved: {Path(cfg.run.output_dir) / name}", flush=True)


def save_run_outputs(run: OpenRun, model, tokenizer) -> None:
    save_trained(model, run.config.method, run.dir)
    tokenizer.save_pretrained(run.dir / "tokenizer")  # includes the chat template used in training
    plot_loss(run.dir / "metrics.jsonl", run.dir / "loss.png")


def manifest_base(kind: str, run: OpenRun, resolved_model, parameters: tuple[int, int], started: str,
                  result, placement) -> dict:
    """The manifest fields every run has; recipes add their data and objective sections."""
    trainable, total = parameters
    return {
        "kind": kind, "run_name": run.name, "versions": versions(),
        "model": {"id": resolved_model.id, "source": resolved_model.source, "path": str(resolved_model.path),
                  "sha256": resolved_model.sha256},
        "method": run.config.method.name, "parameters": {"trainable": trainable, "total": total},
        "seed": run.config.train.seed, "started": started, "finished": now_iso(),
        "steps": result.steps, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
        # speed of this process: after --resume, the tokens of its own steps over its own seconds
        "train_seconds": round(result.seconds, 2), "tokens_this_process": result.tokens - result.resumed_tokens,
        "tokens_per_s": round(result.tokens_per_s, 2),
        "final_loss": result.final_loss, "best_step": result.best_step, "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from, "precision": placement.precision, "device": str(placement.device),
    }
