"""Methods that train the model's own weights: all of them, or a chosen subset."""
from __future__ import annotations

from tunesmith.errors import ConfigError
from tunesmith.methods import register_method


@register_method("full", saves="model")
def build_full(model, cfg, task_type: str = "CAUSAL_LM"):
    """Full fine-tuning: every weight is trained."""
    # task_type (methods/peft_methods.TASK_TYPES) changes nothing here: a head is a weight like the others
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@register_method("selective", saves="model", options=("trainable",))
def build_selective(model, cfg, task_type: str = "CAUSAL_LM"):
    """Train only parameters whose name contains one of method.trainable (biases, norms, layers...)."""
    from tunesmith.methods.peft_methods import SCORE_HEAD

    # a sequence classifier's score head is new (random): it is trained whole, as PEFT's modules_to_save does
    head = f"{SCORE_HEAD}." if task_type == "SEQ_CLS" else None
    chosen = 0
    for name, p in model.named_parameters():
        asked = any(frag in name for frag in cfg.trainable)
        p.requires_grad_(asked or (head is not None and name.startswith(head)))
        chosen += asked
    if not chosen:
        names = sorted({n.split(".")[-2] for n, _ in model.named_parameters() if "." in n})
        raise ConfigError(f"method.trainable {cfg.trainable} matches no parameter; names include {names[:12]}")
    return model
