"""Helpers of tests/test_reward_model.py, in a module of their own: the ranks that torch.multiprocessing
spawns import it, and it imports no more than they need (not TRL, not the CLI)."""
from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB, PAD = 48, 0


def tiny_scorer(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=PAD, initializer_range=0.3)
    return LlamaForSequenceClassification(cfg).float().eval()


def fixed_batch(pairs_n: int = 6, seed: int = 1) -> dict:
    """Chosen rows then rejected rows of different lengths, right-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (2 * pairs_n,), generator=g)
    ids = torch.full((2 * pairs_n, 10), PAD)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


MARGINS = torch.tensor([0.1, 0.7, -0.2, 0.4])


def lora_scorer():
    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method

    model = get_method("lora").build(tiny_scorer(seed=3), MethodSection(r=4, target_modules=["q_proj", "v_proj"]),
                                     task_type="SEQ_CLS")
    return model.train()


def ddp_rank(rank: int, world: int, init: str, out: str):
    from tunesmith.recipes.reward import RewardLoss
    from tunesmith.training import loop
    from tunesmith.training.device import choose_placement
    from tunesmith.config import DistributedSection
    from tunesmith.training.distributed.strategy import DDPStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        batch = fixed_batch(4, seed=5)
        mine = [rank * 2, rank * 2 + 1]  # this rank's 2 pairs: their chosen rows, then their rejected rows
        rows = mine + [4 + i for i in mine]
        share = {k: v[rows] for k, v in batch.items()} | {"units": 2, "margin": MARGINS[mine]}
        placement = choose_placement("fp32")
        strategy = DDPStrategy(placement, DistributedSection())
        model = lora_scorer()
        module = strategy.prepare(model, RewardLoss(0.05))
        loss, n = loop.accumulate(module, [share], loop.call_module, placement, strategy=strategy)
        if rank == 0:
            torch.save({"loss": loss, "grads": {k: p.grad.clone() for k, p in model.named_parameters()
                                                if p.grad is not None}}, out)
    finally:
        dist.destroy_process_group()


