"""A model's shape from its config alone: no weights read, nothing downloaded unless asked.

Where a config comes from (`model_config`): a config.json file; a local HF directory; a .gguf
file or an embedded alias (resolved as training would: the GGUF is converted once into the cache);
a hub id or hub alias whose config.json is in the Hugging Face cache (or downloaded when the hub
is reachable and downloads are allowed: config.json only, a few KB).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError


@dataclass(frozen=True)
class ModelShape:
    """The numbers memory and FLOPs estimates need (decoder-only transformer)."""
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool               # output head shares the input embedding
    max_positions: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        c = getattr(config, "text_config", None) or config  # multimodal wrappers keep the LM's in text_config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(model_type=c.model_type, hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=c.intermediate_size, vocab=c.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   max_positions=getattr(c, "max_position_embeddings", 0) or 0)


def model_config(spec: str, trust_remote_code: bool = False):
    """(transformers config, where it came from) for a model spec as `model.name` takes it."""
    from transformers import AutoConfig

    from tunesmith.models.families import HUB_ALIASES
    from tunesmith.models.registry import ALIASES, resolve_model

    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path),
                                          trust_remote_code=trust_remote_code), str(path)
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), str(path / "config.json")
    if spec in ALIASES or (path.is_file() and path.suffix == ".gguf"):
        resolved = resolve_model(spec)
        return AutoConfig.from_pretrained(str(resolved.path)), f"{spec} ({resolved.path / 'config.json'})"
    repo = HUB_ALIASES[spec.lower()].repo if spec.lower() in HUB_ALIASES else spec
    if repo.count("/") != 1 or path.exists():
        raise ModelError(f"model '{spec}': no config.json found (give a config.json file, a model directory, "
                         "an alias, or a hub id like org/name)")
    config = AutoConfig.from_pretrained(_hub_config(repo), trust_remote_code=trust_remote_code)
    return config, f"{repo} (hub config.json)"


def _hub_config(repo: str) -> str:
    """The local path of a hub repo's config.json: from the cache, else downloaded (config.json only)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"the config.json of {repo} is not in the Hugging Face cache and downloads are off "
                         f"(HF_HUB_OFFLINE=1): pass a config.json file instead (model.name=path/to/config.json), "
                         "or unset HF_HUB_OFFLINE to fetch it (config.json only, a few KB)")
    try:
        return str(Path(hf_hub_download(repo, "config.json", etag_timeout=5)).parent)
    except Exception as exc:  # noqa: BLE001 - any hub failure: say what to give instead
        raise ModelError(f"could not fetch the config.json of {repo} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); pass a config.json file instead "
                         "(model.name=path/to/config.json)") from exc
