"""Loading a run or model for inference, and batched KV-cached generation with its chat template."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.data.tokenize import ensure_chat_template, prompt_ids
from tunesmith.errors import ModelError
from tunesmith.models.load import attach_adapter, load_model, load_tokenizer
from tunesmith.models.registry import resolve_model


@dataclass
class InferenceModel:
    model: torch.nn.Module
    tokenizer: object
    label: str


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "manifest.json").is_file() and (
        (p / "adapter" / "adapter_config.json").is_file() or (p / "model" / "config.json").is_file())


def _load_run(run: Path, adapter: bool):
    """Base model loaded the way it was trained (QLoRA: 4-bit) plus the run's adapter, or the run's
    whole model for methods that train the weights themselves."""
    import yaml

    from tunesmith.config import parse_config
    from tunesmith.methods import get_method

    manifest = json.loads((run / "manifest.json").read_text())
    cfg = parse_config(yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))
    base = manifest["model"]
    tokenizer = load_tokenizer(run / "tokenizer")
    if adapter and (run / "model" / "config.json").is_file():
        return load_model(run / "model"), tokenizer, run.name
    path = Path(base["path"]) if Path(base["path"]).is_dir() else resolve_model(base["id"]).path
    model = load_model(path, **get_method(cfg.method.name).load_kwargs(cfg.method))
    if adapter:
        return attach_adapter(model, run / "adapter"), tokenizer, run.name
    return model, tokenizer, f"{base['id']} (base of {run.name})"


def load_for_inference(spec: str | Path, adapter: bool = True) -> InferenceModel:
    """A run directory (base model + its adapter + the tokenizer/template it trained with), or a
    model spec (alias, directory, GGUF, hub id). adapter=False loads a run's base model only."""
    if is_run_dir(spec):
        model, tokenizer, label = _load_run(Path(spec), adapter)
    elif Path(spec).is_dir() and (Path(spec) / "manifest.json").is_file():
        raise ModelError(f"{spec} looks like a run directory but holds no adapter/ or model/ (did the run finish?)")
    else:
        resolved = resolve_model(str(spec))
        tokenizer, model, label = load_tokenizer(resolved.path), load_model(resolved.path), resolved.id
    ensure_chat_template(tokenizer)
    model.eval()
    return InferenceModel(model, tokenizer, label)


@torch.no_grad()
def generate(im: InferenceModel, conversations: list[list[dict]], max_new_tokens: int = 128,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Assistant replies to each conversation, generated in left-padded batches (greedy when
    temperature is 0). Prompts are sorted by length so batches carry little padding."""
    tok = im.tokenizer
    prompts = [prompt_ids(tok, conv) for conv in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        gen = im.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                use_cache=True, **sampling)
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
    return out
