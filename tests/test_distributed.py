"""Data parallelism keeps the loss the mean over all trained tokens of the step:
2 ranks x batch 4 gives the same gradients as 1 process x batch 8 (gloo, CPU), through the DDP
strategy the training loop uses (its comm hook sums, DDP's own averages)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_llama
from test_engine import grads_after, varied_examples
from tunesmith.config import DistributedSection, MethodSection
from tunesmith.data.batching import collate
from tunesmith.methods import get_method
from tunesmith.training import loop
from tunesmith.training.device import choose_placement
from tunesmith.training.distributed.strategy import DDPStrategy
from tunesmith.training.losses import sft_loss_sum


def model():
    m = get_method("lora").build(tiny_llama(256, seed=1), MethodSection(r=4))
    m.train()
    return m


def rank_main(rank: int, world: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ex = varied_examples()
        # unequal shares on purpose: rank 0 gets the short examples, rank 1 the long ones
        share = sorted(ex, key=lambda e: len(e.input_ids))[rank * 4:(rank + 1) * 4]
        placement = choose_placement("fp32")
        strategy = DDPStrategy(placement, DistributedSection())
        m = model()
        module = strategy.prepare(m, sft_loss_sum)
        # two micro-batches: the first under no_sync, the second exchanges the step's gradients
        batches = [collate(share[:2], 0), collate(share[2:], 0)]
        loop.accumulate(module, batches, loop.call_module, placement, strategy=strategy)
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_two_ranks_batch_4_equal_one_process_batch_8(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(rank_main, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    ranked = torch.load(out)
    single = grads_after(model(), [collate(varied_examples(), 0)])
    assert ranked.keys() == single.keys() and single
    for k in single:
        torch.testing.assert_close(ranked[k], single[k], rtol=1e-5, atol=1e-6)


def test_every_rank_makes_as_many_forwards_and_each_example_counts_once():
    """A short last batch splits unevenly (5 examples over 2 ranks, forwards of 2): the rank with
    fewer examples adds zero-weighted fillers so that a sharded model's per-forward all-gathers
    line up, and the ranks' own examples are the step's, each once."""
    step = [list(range(4)), [4]]  # a batch of 4 and an epoch's short last batch
    per_rank = [loop._forwards(step, r, 2, 2, False) for r in range(2)]
    assert [len(f) for f, _ in per_rank] == [2, 2]
    assert [own for _, own in per_rank] == [2, 1]
    owned = [e for forwards, own in per_rank for g in forwards[:own] for e in g]
    assert owned == [0, 1, 2, 3, 4]
    assert loop._forwards(step, 0, 1, 2, False) == (step, 2)  # one process keeps its micro-batches
