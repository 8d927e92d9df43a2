"""Optional experiment trackers, fed the same records as metrics.jsonl.

Each tracker wraps one upstream API (TensorBoard's SummaryWriter, MLflow's fluent API with a local
store, W&B in offline mode) so an upstream rename touches one class. All write inside the run
directory, so a run stays self-contained and nothing is sent over the network.
"""
from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ConfigError


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"tracking with {extra} needs the package '{module.split('.')[0]}': "
                          f"pip install 'tunesmith[tracking]'") from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        tb = _need("torch.utils.tensorboard", "TensorBoard")
        self.writer = tb.SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config}\n```")

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        self.mlflow = _need("mlflow", "MLflow")
        # a local SQLite store (MLflow's file store is frozen upstream); artifacts beside it
        self.mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        self.mlflow.set_experiment("tunesmith")
        self.run = self.mlflow.start_run(run_name=name)
        flat = {k: v for k, v in _flatten(config).items() if v is not None}
        self.mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        wandb = _need("wandb", "Weights & Biases")
        # offline: nothing leaves the machine; `wandb sync` uploads later if the user wants.
        self.run = wandb.init(project="tunesmith", name=name, dir=str(run_dir), mode="offline", config=config,
                              settings=wandb.Settings(silent=True, x_disable_stats=True))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Trackers:
    """Fan-out to the enabled trackers; numeric metrics only."""

    def __init__(self, names: list[str], run_dir: Path, name: str, config: dict):
        unknown = set(names) - set(TRACKERS)
        if unknown:
            raise ConfigError(f"unknown tracker(s) {sorted(unknown)}; choose from {sorted(TRACKERS)}")
        self.active = [TRACKERS[n](run_dir, name, config) for n in names]

    def log(self, step: int, record: dict) -> None:
        metrics = {k: float(v) for k, v in record.items()
                   if k not in ("step", "elapsed_s") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.active:
            t.log(step, metrics)

    def close(self) -> None:
        for t in self.active:
            t.close()
