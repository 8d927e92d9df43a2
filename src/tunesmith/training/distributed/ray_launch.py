"""`launcher: ray`: the run's ranks as Ray Train workers (`ray.train.torch.TorchTrainer`).

`tunesmith train CONFIG train.distributed.launcher=ray train.distributed.workers=N` connects to
the Ray cluster this machine belongs to (`ray start --head` / `ray start --address=...`, or
RAY_ADDRESS), or starts a private one on this machine when there is none, and runs
`tunesmith train CONFIG ...` in each of N workers: one GPU each when the cluster has GPUs, else
CPU workers. Ray Train makes the torch process group (nccl on GPUs, gloo on CPUs, or
train.distributed.backend) before the command starts; group.process_group() takes it as it is.
So the run is the same as under torchrun: same steps, same losses, one run directory.
Each worker runs on the GPU Ray gave it (ray.train.torch.get_device(), which may differ from its
LOCAL_RANK when Ray shows a worker several GPUs): tunesmith's placement reads the current device.
Progress lines are rank 0's, forwarded by Ray with the worker's pid in front; a failed worker
comes back as a DistributedError naming its rank, with its own error.

Where things are written:
- The run directory is written by rank 0, at run.output_dir/run.name as seen from rank 0's
  process, after it changes to this command's working directory. On one machine that is this
  machine's path. Across machines every node must see the same files at the same paths: the
  config, the data, the model, and run.output_dir (a shared filesystem such as NFS, or
  run.output_dir on shared storage mounted everywhere); otherwise the workers on other nodes
  cannot read the data and rank 0, which Ray may place on any node, writes the run there.
- Ray's own result files (its controller state) go to a temporary directory that is removed
  when the run ends, never into the run directory.

Only this module imports ray (`pip install 'tunesmith[ray]'`).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import traceback
import uuid

from tunesmith.training.distributed.group import DistributedError

EXTRA = "pip install 'tunesmith[ray]'"
# variables a worker on another node should see as they are here (a local Ray instance inherits
# them anyway); PYTHONPATH is not one: paths differ between machines
FORWARD_ENV_PREFIXES = ("TUNESMITH_", "HF_", "NCCL_", "OMP_NUM_THREADS", "CUDA_LAUNCH_BLOCKING",
                        "PYTORCH_CUDA_ALLOC_CONF")


class RankFailed(Exception):
    """What a worker sends back when its command failed: which rank, the error, and (for an
    error that is not tunesmith's own) the traceback."""

    def __init__(self, rank: int, message: str, trace: str = ""):
        super().__init__(rank, message, trace)
        self.rank, self.message, self.trace = rank, message, trace

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.message}"


def import_ray():
    try:
        import ray
        from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise DistributedError(f"train.distributed.launcher=ray needs Ray Train, which is not installed ({exc}): "
                               f"{EXTRA}, or use train.distributed.launcher=torchrun") from None
    return ray, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TorchConfig, TorchTrainer


def train_args(argv: list[str]):
    """The `tunesmith train` arguments in argv, parsed as the command line parses them."""
    from tunesmith.cli import parse_args

    args = parse_args(argv)
    if args.command != "train":
        raise DistributedError(f"the ray launcher runs `tunesmith train`, not `tunesmith {' '.join(argv[:1])}`")
    return args


def run_ray(argv: list[str], workers: int) -> int:
    """Run `tunesmith <argv>` (a `train` command) as `workers` Ray Train workers; 0 when every
    rank finished, else a DistributedError naming the rank that failed."""
    from tunesmith.config import load_config

    if workers < 1:
        raise DistributedError(f"train.distributed.workers={workers}: the ray launcher needs at least 1 worker")
    args = train_args(argv)
    dcfg = load_config(args.config, list(args.overrides)).train.distributed
    ray, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TorchConfig, TorchTrainer = import_ray()
    started_here = connect(ray, workers)
    ray_dir = tempfile.mkdtemp(prefix="tunesmith-ray-")  # Ray's own result files, never the run directory
    try:
        use_gpu, cpus = worker_resources(ray.cluster_resources(), workers, started_here)
        if dcfg.backend == "nccl" and not use_gpu:
            raise DistributedError("train.distributed.backend=nccl needs GPU workers, and the Ray cluster has no GPUs: "
                                   "use gloo (or auto)")
        print(f"starting {workers} Ray Train workers ({'1 GPU' if use_gpu else f'{cpus} CPU(s)'} each)", flush=True)
        trainer = TorchTrainer(
            worker_main,
            train_loop_config={"argv": list(argv), "cwd": os.getcwd(),
                               "driver_node": ray.get_runtime_context().get_node_id()},
            # GPU workers ask for their GPU only (Ray's default: nodes have more cores than GPUs)
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker=None if use_gpu else {"CPU": cpus}),
            # auto: Ray picks nccl for GPU workers and gloo for CPU ones, as group.backend_for does
            torch_config=TorchConfig(backend=None if dcfg.backend == "auto" else dcfg.backend,
                                     timeout_s=math.ceil(dcfg.timeout_s)),
            run_config=RunConfig(
                name=f"tunesmith-{uuid.uuid4().hex[:8]}", storage_path=ray_dir,
                # a retried worker group would start the run again from nothing: stop instead, and
                # let the user continue it with --resume
                failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
                worker_runtime_env={"env_vars": forwarded_env(cpus)},
                logging_config=LoggingConfig(log_level="WARNING")),  # not the controller's progress lines
        )
        fit(trainer)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
        if started_here:
            ray.shutdown()
    return 0


def connect(ray, workers: int) -> bool:
    """Join the running Ray cluster (RAY_ADDRESS, or the one `ray start` made on this machine), else
    start a private instance here (also when RAY_ADDRESS=local); True when it was started here
    (and must be shut down)."""
    import logging

    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith("ray://"):
        raise DistributedError(f"RAY_ADDRESS={address} is a Ray Client address: run tunesmith on a node of the "
                               "cluster instead (the workers read the config and data at this command's paths), "
                               "with RAY_ADDRESS unset or set to the cluster's GCS address (host:6379)")
    if ray.is_initialized():  # a caller's own Ray session
        return False
    # a private instance's token-auth notice says nothing about this run
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not sys.stdout.isatty():  # rank 0's lines come through Ray's log forwarding, coloured for terminals
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # the dashboard stays (on localhost): Ray Train's placement-group cleaner asks its state API
    # whether the run's controller lives, and without it warns every second
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address and address != "local":
        ray.init(**quiet)
        return False
    if not address:
        try:
            ray.init(address="auto", **quiet)
            return False
        except ConnectionError:  # no cluster on this machine
            pass
    # as many CPU slots as workers at least: like torchrun, a private run may share cores
    ray.init(num_cpus=max(os.cpu_count() or 1, workers), **quiet)
    return True


def worker_resources(have: dict, workers: int, local: bool) -> tuple[bool, int]:
    """(one GPU per worker?, CPUs per worker) from the cluster's resources `have`: GPUs whenever the
    cluster has any, and the machine's cores shared out among CPU workers on a private instance.
    Too few GPUs on a private instance (this machine) would leave Ray waiting forever, so that is
    an error; a cluster may be autoscaling, so there it is a note."""
    from tunesmith.training.distributed.launch import threads_per_rank

    gpus = int(have.get("GPU", 0))
    if not gpus:
        return False, threads_per_rank(workers) if local else 1
    if workers > gpus:
        if local:
            raise DistributedError(f"train.distributed.workers={workers}, but this machine has {gpus} GPU(s) and a "
                                   f"Ray worker takes one: ask for at most {gpus} workers")
        print(f"note: the Ray cluster has {gpus} GPU(s) now for {workers} workers (one each); Ray waits until it "
              "has enough", flush=True)
    return True, 1


def forwarded_env(cpus: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", str(cpus))
    # progress comes from rank 0's stdout; Ray Train's print patch would turn it into log records
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def fit(trainer) -> None:
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise DistributedError(describe(exc)) from None


def describe(exc) -> str:
    """The failed ranks from Ray Train's error: the lowest rank's own error (with its traceback
    when it is not a tunesmith error), and which others failed."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:  # Ray's controller itself failed (placement, a lost node)
        return f"the Ray Train run failed: {exc}"
    mine = {rank: unwrap(err) for rank, err in failures.items()}
    first = min(mine)
    err = mine[first]
    if isinstance(err, RankFailed):
        if err.trace:
            print(err.trace, file=sys.stderr, end="")
        message = err.message
    else:  # the worker died before or outside tunesmith's command (killed, out of memory)
        message = f"{type(err).__name__}: {err}"
    others = sorted(r for r in mine if r != first)
    tail = f" (ranks {others} failed too)" if others else ""
    return (f"Ray worker rank {first} failed{tail}: {message}. A run with checkpoints continues with --resume "
            "(on any number of workers)")


def unwrap(err: BaseException) -> BaseException:
    """Ray hands back a worker's exception wrapped; the RankFailed inside it, if any."""
    seen = err
    for _ in range(5):
        if isinstance(seen, RankFailed):
            return seen
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None:
            break
        seen = inner
    return err


def worker_main(config: dict) -> None:
    """One rank, in a Ray Train worker: the process group exists, RANK / WORLD_SIZE / LOCAL_RANK
    are set; run the same `tunesmith train` command the driver was given."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    try:
        enter_cwd(config["cwd"])
        use_ray_device()
        with quiet_unless_main(rank):
            if rank == 0 and ray.get_runtime_context().get_node_id() != config["driver_node"]:
                print(f"note: rank 0 runs on another node than this command ({os.uname().nodename}); the run "
                      "directory is written there (use a shared filesystem)", flush=True)
            run_train(config["argv"])
    except BaseException as exc:
        raise as_rank_failure(rank, exc) from None


def as_rank_failure(rank: int, exc: BaseException) -> RankFailed:
    from tunesmith.errors import TunesmithError

    if isinstance(exc, TunesmithError):
        return RankFailed(rank, "\n".join([str(exc), *getattr(exc, "__notes__", [])]))
    return RankFailed(rank, f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)))


def run_train(argv: list[str]) -> None:
    """cli.main without what belongs to a real command line: signal handlers (this runs in a
    thread of Ray's worker) and the allocator restart."""
    from tunesmith.cli import quiet_upstream

    args = train_args(argv)
    quiet_upstream()
    kwargs = {k: v for k, v in vars(args).items() if k not in ("fn", "command") and not k.endswith("_command")}
    args.fn(**kwargs)


def enter_cwd(cwd: str) -> None:
    """Relative paths in the command and config mean what they mean to the driver."""
    if not os.path.isdir(cwd):
        raise DistributedError(f"the directory the command was started in, {cwd}, does not exist on node "
                               f"{os.uname().nodename}: Ray workers on several nodes need a shared filesystem with "
                               "the config, data, model and run.output_dir at the same paths")
    os.chdir(cwd)


def use_ray_device() -> None:
    """Ray gives each GPU worker its GPU (and may show it every GPU of the node): make it the
    current device, which tunesmith's placement reads, and LOCAL_RANK its index, which
    group.rank_device() reads."""
    import torch

    if not torch.cuda.is_available():
        return
    from ray.train.torch import get_device

    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ["LOCAL_RANK"] = str(device.index)


@contextlib.contextmanager
def quiet_unless_main(rank: int):
    """Progress and reports come from rank 0 only, as under torchrun (errors come back through
    Ray); TUNESMITH_LOG_ALL_RANKS=1 keeps every rank's output."""
    if rank == 0 or os.environ.get("TUNESMITH_LOG_ALL_RANKS") == "1":
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
