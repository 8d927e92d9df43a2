"""Evaluation under several processes: every example scored by one process only, results gathered,
and the numbers those of one process. Also KTO's reference point z0, gathered over processes.

The helper and the evaluators run in 2 ranks started by mp.spawn (gloo); the recipes run as real
`tunesmith train CFG --nproc 2` runs, compared with the 1-process run of the same config.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import build_tokenizer, tiny_llama, write_jsonl
from test_dpo import pairs
from tunesmith.config import EvalTaskSection
from tunesmith.demo.orders import make_splits

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model directory and the data of every test here (built like /tmp/d/mk.py)."""
    root = tmp_path_factory.mktemp("evalshard")
    tok = build_tokenizer()
    tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", make_splits(7, {"train": 16})["train"])
    write_jsonl(root / "val.jsonl", make_splits(8, {"train": 7})["train"])  # 7: batches of 2 split unevenly
    (root / "text.txt").write_text(" ".join(f"order {i} ships to Lisbon in red." for i in range(40)))
    write_jsonl(root / "mc.jsonl", [{"question": f"Which colour is item {i}?", "choices": ["red", "dark blue", "green"],
                                     "answer": i % 3} for i in range(9)])
    write_jsonl(root / "p_train.jsonl", pairs(21, 16))
    write_jsonl(root / "p_val.jsonl", pairs(22, 7))
    return root


def tasks(root: Path) -> list[dict]:
    """One task of every kind (and both perplexity inputs), sized to split unevenly over 2 ranks."""
    return [{"name": "ppl", "kind": "perplexity", "path": str(root / "val.jsonl"), "batch_size": 2},
            {"name": "text", "kind": "perplexity", "path": str(root / "text.txt"), "max_length": 64, "stride": 32,
             "batch_size": 2},
            {"name": "orders", "kind": "generation", "path": str(root / "val.jsonl"), "max_new_tokens": 8,
             "batch_size": 2, "metrics": ["exact_match", "json"], "json_fields": ["customer", "city"]},
            {"name": "mc", "kind": "multiple_choice", "path": str(root / "mc.jsonl"), "batch_size": 2, "shots": 1}]


# --- in-process ranks (mp.spawn, gloo) --------------------------------------------------------

def evaluate_all(root: Path) -> tuple[dict, int]:
    """(task -> result as JSON, rows this process ran through the decoder) on the tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.eval.run import run_task
    from tunesmith.generation import InferenceModel

    model = AutoModelForCausalLM.from_pretrained(root / "model").float().eval()
    rows = [0]
    model.model.register_forward_hook(lambda m, args, kwargs, out: rows.__setitem__(0, rows[0] + out[0].shape[0]),
                                      with_kwargs=True)
    im = InferenceModel(model, AutoTokenizer.from_pretrained(root / "model"), "tiny")
    results = {t["name"]: run_task(im, EvalTaskSection(**t)).to_json() for t in tasks(root)}
    for r in results.values():
        r.pop("seconds")
    return results, rows[0]


def kl_sides(rank: int | None):
    """Policy and reference log-probs of 8 mismatched rows; one rank's half, or all of them."""
    g = torch.Generator().manual_seed(5)
    policy, ref = -10 * torch.rand(8, generator=g), -10 * torch.rand(8, generator=g)
    part = slice(None) if rank is None else slice(0, 3) if rank == 0 else slice(3, None)  # unequal halves
    return policy[part], ref[part]


def rank_main(rank: int, world: int, init: str, root: str):
    from tunesmith.training.distributed.group import gather_lists, map_shared
    from tunesmith.training.preference import kto_kl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        calls = []
        mapped = map_shared(lambda u: calls.append(u) or u * u, list(range(7)))
        out = {"gathered": gather_lists([f"r{rank}"] * (rank + 1)), "mapped": mapped,
               "calls": gather_lists(calls), "mine": calls}
        out["z0"] = float(kto_kl(*kl_sides(rank), across_ranks=True))
        out["z0_local"] = float(kto_kl(*kl_sides(rank)))
        out["results"], out["rows"] = evaluate_all(Path(root))
        with open(Path(root) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(work):
    mp.spawn(rank_main, args=(2, f"file://{work / 'init'}", str(work)), nprocs=2, join=True)
    return [pickle.loads((work / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def test_gather_lists_and_map_shared_on_two_ranks(spawned):
    for out in spawned:
        assert out["gathered"] == ["r0", "r1", "r1"]  # rank order, on every rank
        assert out["mapped"] == [u * u for u in range(7)]  # the units' order, on every rank
        assert sorted(out["calls"]) == list(range(7))  # each unit computed once, by one rank
    assert spawned[0]["mine"] and spawned[1]["mine"]  # both took part


def test_kto_z0_over_ranks_is_the_one_process_z0(spawned):
    from tunesmith.training.preference import kto_kl

    alone = float(kto_kl(*kl_sides(None)))
    assert spawned[0]["z0"] == spawned[1]["z0"] == alone  # the same bits: float64 sum, then one rounding
    assert spawned[0]["z0_local"] != alone  # a rank's own half would give another baseline


def test_evaluators_shard_examples_and_equal_one_process(spawned, work):
    alone, rows = evaluate_all(work)
    for out in spawned:  # every rank returns the whole result, the one process's
        assert out["results"].keys() == alone.keys()
        for name, result in alone.items():
            assert out["results"][name]["metrics"] == result["metrics"], name  # the same batches: the same bits
            assert [r["id"] for r in out["results"][name]["examples"]] == [r["id"] for r in result["examples"]]
        assert [r["prediction"] for r in out["results"]["orders"]["examples"]] == \
            [r["prediction"] for r in alone["orders"]["examples"]]
        assert [r["prediction"] for r in out["results"]["mc"]["examples"]] == \
            [r["prediction"] for r in alone["mc"]["examples"]]
    # each row through the decoder once: the ranks' rows add up to one process's, and both ranks worked;
    # only multiple choice's probes and shared head run on every rank: the cache probe (one row) and the block
    # probe (one block row + two plain rows) of the scorer and of the results' `scoring` setting, the task's
    # shared head (one row)
    assert spawned[0]["rows"] + spawned[1]["rows"] == rows + 2 * (1 + 3) + 1
    assert 0 < spawned[1]["rows"] < rows


# --- real runs: `tunesmith train CFG --nproc N` -----------------------------------------------

def launch(root: Path, name: str, config: dict, nproc: int) -> subprocess.CompletedProcess:
    path = root / f"{name}.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = ["--nproc", str(nproc)] if nproc > 1 else []  # 1: this process alone, no launcher
    return subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path), f"run.name={name}-{nproc}", *procs],
                          env=env, capture_output=True, text=True, timeout=600)


def train(root: Path, name: str, config: dict, nproc: int) -> Path:
    proc = launch(root, name, config, nproc)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
    assert proc.returncode == 0, "\n".join(errors[:10]) + proc.stdout[-2000:]
    return root / "runs" / f"{name}-{nproc}"


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s", "eta_s", "time")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_rows(a: list[dict], b: list[dict], rel: float = 1e-4):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-5), (x["step"], k)


def both(root: Path, name: str, config: dict) -> list[Path]:
    return [train(root, name, config, n) for n in (1, 2)]


def base_config(root: Path, **train_cfg) -> dict:
    return {"model": {"name": str(root / "model")}, "method": {"name": "lora", "r": 4, "dropout": 0.0},
            "run": {"output_dir": str(root / "runs")},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 0.01, "eval_every": 1, **train_cfg}}


@pytest.fixture(scope="module")
def sft_runs(work):
    cfg = base_config(work, save_every=1, restore_best=True)
    cfg |= {"data": {"train": str(work / "train.jsonl"), "validation": str(work / "val.jsonl")},
            "eval": {"tasks": tasks(work), "during_training": True, "best_metric": "ppl/perplexity"}}
    return both(work, "sft", cfg)


@pytest.mark.slow
def test_eval_tasks_during_training_equal_one_process(sft_runs):
    one, two = sft_runs
    rows = [r for r in metrics(one) if "eval/ppl/perplexity" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval/mc/acc" in rows[0] and "val_loss" in rows[0]
    same_rows(metrics(one), metrics(two))
    for step in ("step-1", "step-2", "step-3", ""):
        for name in ("ppl", "text", "orders", "mc"):
            a, b = (json.loads((run / "eval" / step / f"{name}.json").read_text()) for run in (one, two))
            assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-4), (step, name)
            assert [r.get("prediction") for r in a["examples"]] == [r.get("prediction") for r in b["examples"]]
    # the task metric picked the same checkpoint on every rank and in both runs
    best = [json.loads((run / "manifest.json").read_text())["best_step"] for run in sft_runs]
    assert best[0] == best[1] is not None
    # rank 0 alone wrote: no stray temporary files beside the results
    assert sorted(p.name for p in (two / "eval" / "step-3").iterdir()) == ["mc.json", "orders.json", "ppl.json",
                                                                           "text.json"]


def preference_config(root: Path, **objective) -> dict:
    cfg = base_config(root, lr=0.02)
    return cfg | {"data": {"train": str(root / "p_train.jsonl"), "validation": str(root / "p_val.jsonl")},
                  "objective": {"name": "dpo", "beta": 0.5, **objective}}


@pytest.mark.slow
def test_dpo_held_out_accuracy_and_precomputed_reference_equal_one_process(work):
    one, two = both(work, "dpo", preference_config(work, reference="precomputed"))
    rows = metrics(one)
    assert [r["step"] for r in rows if "val_preference_accuracy" in r] == [0, 1, 2, 3]
    assert rows[-1]["val_preference_accuracy"] > 0  # the held-out numbers move, so equality means something
    same_rows(rows, metrics(two))  # losses (the reference cache gathered) and held-out numbers
    ends = [json.loads((run / "manifest.json").read_text())["preference_accuracy"] for run in (one, two)]
    assert ends[0]["start"] == pytest.approx(ends[1]["start"], rel=1e-5)
    assert ends[0]["end"] == pytest.approx(ends[1]["end"], rel=1e-4)
    assert ends[0]["end"]["val_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_kto_losses_and_z0_equal_one_process(work):
    # undesirable examples weighted down: the policy's log-ratio on the mismatched rows rises above 0
    one, two = both(work, "kto", preference_config(work, loss="kto", undesirable_weight=0.1))
    a, b = metrics(one), metrics(two)
    same_rows(a, b)
    kl = [r["kl"] for r in a if "kl" in r]
    # z0 (logged as kl, after clamping at 0) was positive, so the losses depend on it: each rank's
    # own half of the rows would give another z0 and losses some 10% apart
    assert len(kl) == 3 and min(kl[1:]) > 1


def test_kto_on_several_processes_refuses_accumulation(work, monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.recipes import dpo

    cfg = preference_config(work, loss="kto")
    cfg["train"] |= {"grad_accum": 2, "batch_size": 2}
    (work / "kto-accum.json").write_text(json.dumps(cfg))
    runs = set((work / "runs").glob("*"))
    monkeypatch.setattr(dpo, "world", lambda: (0, 2))  # as rank 0 of 2 (the check comes before any collective)
    with pytest.raises(ConfigError, match=r"on 2 processes needs train.grad_accum=1 \(it is 2\).*"
                                          r"Set train.batch_size=4 train.grad_accum=1"):
        dpo.run_dpo(load_config(work / "kto-accum.json"))
    assert set((work / "runs").glob("*")) == runs  # refused before any work
