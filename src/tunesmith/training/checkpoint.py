"""Checkpoints for exact resume: trainable weights, optimizer, scheduler, RNG states, data position.

Each checkpoint is written into a temporary folder and renamed into place, so a crash (or a full
disk) mid-write leaves the previous checkpoint intact and no half-written one that looks valid.
Weights are safetensors; optimizer/scheduler/RNG state is loaded with torch.load(weights_only=True),
which refuses arbitrary pickled objects.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.atomic import atomic_dir
from tunesmith.errors import TunesmithError


@dataclass
class TrainState:
    step: int                 # optimizer steps done
    micro_batches: int        # micro-batches consumed from the data stream (the data position)
    tokens: int
    trained_tokens: int
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0        # evaluations since the best (early stopping); absent, so 0, in older checkpoints


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its state.json exists)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(root: Path, model, optimizer, scheduler, state: TrainState, keep_last: int,
                    scaler=None) -> Path:
    final = root / f"step-{state.step}"
    try:
        with atomic_dir(final, if_exists="replace") as tmp:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
            if scaler is not None:  # fp16 loss scale: a resumed run must skip the same overflowing steps
                extra["scaler"] = scaler.state_dict()
            torch.save(extra, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)))  # written last: marks completeness
    except OSError as exc:
        done = checkpoint_dirs(root)
        kept = f"the previous checkpoint {done[-1].name} is intact" if done else "no earlier checkpoint exists"
        raise TunesmithError(f"could not write checkpoint step-{state.step} in {root} ({exc.strerror or exc}); "
                             f"{kept}. Free disk space, then resume with --resume") from exc
    _prune(root, keep_last, state.best_step)
    return final


def _prune(root: Path, keep_last: int, best_step: int | None) -> None:
    done = checkpoint_dirs(root)
    for old in done[:-keep_last] if keep_last > 0 else []:
        if best_step is None or old.name != f"step-{best_step}":
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> TrainState:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise TunesmithError(f"checkpoint {path} does not match this model/method "
                             f"(parameters differ: {sorted(missing)[:4]}...); resume with the run's own config")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    extra = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])
    return TrainState(**json.loads((path / "state.json").read_text()))
