"""Methods that train the model's own weights: all of them, or a chosen subset."""
from __future__ import annotations

from tunesmith.errors import ConfigError
from tunesmith.methods import register_method


@register_method("full", saves="model")
def build_full(model, cfg):
    """Full fine-tuning: every weight is trained."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@register_method("selective", saves="model", options=("trainable",))
def build_selective(model, cfg):
    """Train only parameters whose name contains one of method.trainable (biases, norms, layers...)."""
    chosen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(frag in name for frag in cfg.trainable))
        chosen += p.requires_grad
    if not chosen:
        names = sorted({n.split(".")[-2] for n, _ in model.named_parameters() if "." in n})
        raise ConfigError(f"method.trainable {cfg.trainable} matches no parameter; names include {names[:12]}")
    return model
