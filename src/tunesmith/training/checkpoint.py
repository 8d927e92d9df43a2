"""Checkpoints for exact resume: trainable weights, optimizer, scheduler, RNG states, data position.

Each checkpoint is written into a temporary folder and renamed into place, so a crash (or a full
disk) mid-write leaves the previous checkpoint intact and no half-written one that looks valid.

Two formats, both read by every strategy (resume on any number of processes, with any strategy):
- whole (one process, ddp: every rank holds the same weights, rank 0 writes): trainable weights in
  trainable.safetensors, optimizer/scheduler/RNG in optimizer.pt, loaded with
  torch.load(weights_only=True), which refuses arbitrary pickled objects;
- sharded (fsdp): trainable weights and optimizer state in a torch.distributed.checkpoint (DCP)
  folder `shards/`, every rank writing its own part; DCP reshards on load, so it loads on another
  number of ranks, or whole into one process without a process group. Scheduler and scaler in
  schedule.pt, each rank's RNG in rng-<rank>.pt. (DCP unpickles its metadata: like --resume
  itself, meant for checkpoints a run of yours wrote, not files from elsewhere.)
state.json, written last, marks a checkpoint complete in both.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.atomic import atomic_dir
from tunesmith.errors import TunesmithError
from tunesmith.training.distributed.group import barrier, is_main, world

SHARDS = "shards"  # the DCP folder of a sharded checkpoint


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
    with _disk_errors(root, state.step), atomic_dir(final, if_exists="replace") as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
        if scaler is not None:  # fp16 loss scale: a resumed run must skip the same overflowing steps
            extra["scaler"] = scaler.state_dict()
        torch.save(extra, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))  # written last: marks completeness
    _prune(root, keep_last, state.best_step)
    return final


def save_sharded_checkpoint(root: Path, model, optimizer, scheduler, state: TrainState, keep_last: int,
                            scaler=None) -> Path:
    """Every rank calls it: each writes its shard of the weights and optimizer state (DCP) and its
    RNG state into a staging folder that rank 0 made; once all are written, rank 0 adds the
    schedule and state.json and renames the folder into place (whole or absent)."""
    import torch.distributed.checkpoint as dcp

    final = root / f"step-{state.step}"
    staging = root / f".step-{state.step}.partial"  # a fixed name: every rank finds it without being told
    rank = world()[0]
    with _disk_errors(root, state.step), (atomic_dir(final, if_exists="replace", staging=_fresh(staging))
                                          if is_main() else contextlib.nullcontext(staging)) as tmp:
        barrier()  # the staging folder exists
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / SHARDS)
        torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
        barrier()  # every rank's part is written
        if is_main():
            extra = {"scheduler": scheduler.state_dict(), **({"scaler": scaler.state_dict()} if scaler else {})}
            torch.save(extra, tmp / "schedule.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)))  # written last: marks completeness
    if is_main():
        _prune(root, keep_last, state.best_step)
    barrier()  # the checkpoint is in place before any rank goes on
    return final


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)  # left by a crash during an earlier write of this step
    return path


@contextlib.contextmanager
def _disk_errors(root: Path, step: int):
    try:
        yield
    except OSError as exc:
        done = checkpoint_dirs(root)
        kept = f"the previous checkpoint {done[-1].name} is intact" if done else "no earlier checkpoint exists"
        raise TunesmithError(f"could not write checkpoint step-{step} in {root} ({exc.strerror or exc}); "
                             f"{kept}. Free disk space, then resume with --resume") from exc


def _dcp_state(model, optimizer=None) -> dict:
    """The trained weights (and optimizer state) keyed by parameter name, as DCP saves and loads
    them: DTensor shards under FSDP, whole tensors otherwise. Frozen weights come from the model
    files and are not saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        weights, optim = get_model_state_dict(model, options=options), None
    else:
        weights, optim = get_state_dict(model, optimizer, options=options)  # fills a fresh optimizer's state first
    # torch drops frozen weights by their first name only: a tied one (a frozen head sharing the
    # embeddings) stays under its second; keep the trained ones, each under one name
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in weights.items() if k in trained}, **({"optimizer": optim} if optim else {})}


def _load_shards(path: Path, model, optimizer=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    state = _dcp_state(model, optimizer)
    saved = {k.split(".", 1)[1] for k in dcp.FileSystemReader(str(path / SHARDS)).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    _check_names(path, saved, set(state["model"]))
    with warnings.catch_warnings():  # without a process group one process loads it whole: what is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path / SHARDS)  # in place, each rank its own shard (resharded as needed)
    _set_state(model, optimizer, state["model"], state.get("optimizer"),
               StateDictOptions(ignore_frozen_params=True, strict=False))


def _set_state(model, optimizer, weights: dict, optim_state: dict | None, options) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, weights, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_state, options=options)


def _check_names(path: Path, saved: set, trained: set) -> None:
    if saved != trained:
        raise TunesmithError(f"checkpoint {path} does not match this model/method "
                             f"(parameters differ: {sorted(saved ^ trained)[:4]}...); resume with the run's own config")


def _sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _prune(root: Path, keep_last: int, best_step: int | None) -> None:
    done = checkpoint_dirs(root)
    for old in done[:-keep_last] if keep_last > 0 else []:
        if best_step is None or old.name != f"step-{best_step}":
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> TrainState:
    """Either format into a whole or a sharded (FSDP) model."""
    if (path / SHARDS).is_dir():
        _load_shards(path, model, optimizer)
        extra = torch.load(path / "schedule.pt", weights_only=True)
        rng = path / f"rng-{world()[0]}.pt"  # this rank's own, or rank 0's on more ranks than wrote it
        extra["rng"] = torch.load(rng if rng.is_file() else path / "rng-0.pt", weights_only=True)
    else:
        extra = torch.load(path / "optimizer.pt", weights_only=True)
        _load_whole(path, model, optimizer, extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])
    return TrainState(**json.loads((path / "state.json").read_text()))


def _load_whole(path: Path, model, optimizer, optim_state: dict | None) -> None:
    weights = load_file(str(path / "trainable.safetensors"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _check_names(path, set(weights), set(names))
    if not _sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
        return
    # into FSDP's shards: the optimizer's state is keyed by position in the optimizer (its params
    # are the trained ones in model order, strategy.make_optimizer); by name for set_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if optimizer is not None:
        optim_state = {"state": {names[i]: s for i, s in optim_state["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in optim_state["param_groups"]]}
    _set_state(model, optimizer, weights, optim_state, StateDictOptions(full_state_dict=True, strict=False))


def restore_weights(model, ckpt_root: Path | None, step: int) -> None:
    """train.restore_best: the weights of checkpoint `step`, either format (every rank calls it)."""
    path = ckpt_root / f"step-{step}" if ckpt_root else None
    if path is None or not (path / "state.json").is_file():
        raise TunesmithError(f"train.restore_best: no checkpoint of step {step} (set train.save_every)")
    if (path / SHARDS).is_dir():
        _load_shards(path, model)
    else:
        _load_whole(path, model, None, None)
    print(f"restored the best weights (step {step})", flush=True)
