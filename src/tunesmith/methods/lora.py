"""LoRA through PEFT (adapters saved in PEFT's own format, loadable by PEFT, vLLM and TGI)."""
from __future__ import annotations

from tunesmith.methods import register_method


@register_method("lora")
def build_lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, peft_cfg)
