"""Helpers for tests and benchmarks: an adapter that really changes a model, without training."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml


def randomise_lora(peft_model, seed: int, scale: float) -> None:
    """Give every lora_B matrix seeded random values (PEFT initialises them to 0, a no-op adapter)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * scale


def random_lora_run(base, run: Path, r: int = 8, scale: float = 0.01, seed: int = 0) -> Path:
    """A run directory (manifest, config, tokenizer, adapter) for `base` (a ResolvedModel) whose
    LoRA over all linear layers has seeded random B matrices."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.config import load_config
    from tunesmith.models.load import load_model, load_tokenizer

    run.mkdir(parents=True)
    torch.manual_seed(seed)  # LoRA A's initialisation
    model = get_peft_model(load_model(base.path), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    randomise_lora(model, seed, scale)
    model.save_pretrained(run / "adapter")
    load_tokenizer(base.path).save_pretrained(run / "tokenizer")
    cfg = load_config(None, [f"model.name={base.id}", "method.name=lora", f"method.r={r}"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run / "manifest.json").write_text(json.dumps(
        {"model": {"id": base.id, "path": str(base.path), "source": base.source, "sha256": base.sha256}}))
    return run
