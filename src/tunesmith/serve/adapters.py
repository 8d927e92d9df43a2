"""The adapters directory (names -> folders, validated) and the adapters loaded into the base model.

A model name from a request is only ever looked up among the sub-folders of the configured
directory: it must match NAME_RE (no separators, no leading dot) before any path is built from it,
and the folder must resolve inside the directory (a symlink pointing out is refused). This is the
one module that calls PEFT's adapter APIs for serving. Plain LoRA adapters are read out of PEFT at
load and served from serve/multi_lora.py's stacks (rows of any of them and of the base in one
forward); the others (DoRA, ...) stay in PEFT and run in batches of their own.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import ModelError
from tunesmith.serve.multi_lora import MultiLora, extract, unmixable_reason

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class AdapterSource:
    name: str
    adapter_path: Path            # folder with adapter_config.json + weights
    tokenizer_path: Path | None   # the run's tokenizer (its chat template), or None: the base's
    config: dict                  # adapter_config.json


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and any(
        (path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin"))


class AdapterDir:
    """Discovery and validation of adapter folders: NAME/ is a PEFT adapter, or a tunesmith run
    directory whose adapter/ and tokenizer/ are used."""

    def __init__(self, root: Path | str | None):
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ModelError(f"adapters directory {root} does not exist (create it or pass another --adapters)")

    def names(self) -> list[str]:
        if self.root is None:
            return []
        found = []
        for child in sorted(self.root.iterdir()):
            if NAME_RE.match(child.name) and self._inside(child) and self._source_paths(child):
                found.append(child.name)
        return found

    def _inside(self, path: Path) -> bool:
        return path.resolve().parent == self.root

    @staticmethod
    def _source_paths(folder: Path) -> tuple[Path, Path | None] | None:
        if _is_adapter(folder):
            tok = folder if (folder / "tokenizer_config.json").is_file() else None
            return folder, tok
        if (folder / "manifest.json").is_file() and _is_adapter(folder / "adapter"):
            tok = folder / "tokenizer"
            return folder / "adapter", tok if (tok / "tokenizer_config.json").is_file() else None
        return None

    def locate(self, name: str, known=None) -> AdapterSource:
        """The adapter called `name`, or ModelError (listing known(), default names()). The name
        is checked before any path is made from it."""
        if not isinstance(name, str) or not NAME_RE.match(name) or self.root is None:
            raise self.unknown(name, known)
        folder = self.root / name
        paths = self._source_paths(folder) if folder.is_dir() and self._inside(folder) else None
        if paths is None:
            raise self.unknown(name, known)
        try:
            config = json.loads((paths[0] / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"adapter '{name}': unreadable adapter_config.json ({exc})") from exc
        return AdapterSource(name, paths[0], paths[1], config)

    def unknown(self, name, known=None) -> ModelError:
        # The client sees this message: it names the available models, never a server path.
        names = known() if known is not None else self.names()
        return ModelError(f"unknown model '{name}'; available: {', '.join(names) or '(none)'}")


def check_servable(src: AdapterSource) -> None:
    kind = src.config.get("peft_type", "?")
    if kind != "LORA":
        raise ModelError(f"adapter '{src.name}' is {kind}: serving supports LoRA and DoRA adapters; merge it into "
                         "the base with `tunesmith export` and serve the merged model instead")
    if src.config.get("alora_invocation_tokens"):
        raise ModelError(f"adapter '{src.name}' is an activated LoRA (aLoRA), which serving does not support; "
                         "merge it with `tunesmith export`")


class LoadedAdapters:
    """The base model and the adapters loaded into it: plain LoRA adapters in `multi` (stacked per
    layer, any mix of them and the base in one forward), the others in one PeftModel wrapped around
    the base (one such adapter per batch). Call only from the engine's scheduler thread: loading
    edits the model's modules in place."""

    def __init__(self, base):
        self.base = base
        self.peft = None
        self.multi = MultiLora()
        self.kinds: dict[str, bool] = {}   # loaded name -> mixable (served from self.multi)
        self._mode: str | None = None      # PEFT's state: "off" | the one active adapter; None: unknown

    @property
    def model(self):
        return self.peft if self.peft is not None else self.base

    def load(self, src: AdapterSource) -> None:
        """PEFT loads the adapter (its target modules, patterns and scaling are PEFT's); a plain
        LoRA one is then copied into the stacks and taken out of PEFT again."""
        from peft import PeftModel

        if src.name in self.kinds:
            return
        check_servable(src)
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(src.adapter_path), adapter_name=src.name)
            else:
                self.peft.load_adapter(str(src.adapter_path), adapter_name=src.name)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            if self.peft is None:
                _strip_adapter_layers(self.base)  # PEFT injected its layers before the weights failed
            elif src.name in self.peft.peft_config:
                self._delete(src.name)
            raise ModelError(f"adapter '{src.name}' does not load onto this base model: "
                             f"{' '.join(line.strip() for line in str(exc).splitlines()[:2])[:400]}") from exc
        self._mode = None  # loading may reset which adapter is active and whether layers are on
        why = unmixable_reason(self.peft, src.name, src.config)
        if why is None:
            self.multi.add(src.name, extract(self.peft, src.name))
            self._delete(src.name)
        else:
            log.info("adapter '%s' runs in batches of its own (PEFT), not mixed with others: %s", src.name, why)
            self.peft.eval()
        self.kinds[src.name] = why is None

    def unload(self, name: str) -> None:
        if name not in self.kinds:
            return
        if self.kinds.pop(name):
            self.multi.remove(name)
        else:
            self._delete(name)

    def _delete(self, name: str) -> None:
        self._mode = None
        if len(self.peft.peft_config) == 1:
            # PEFT cannot run a PeftModel with no adapter; take its layers out and keep the bare base.
            self.base = self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    def _route(self, mode: str) -> None:
        """Put the PeftModel in the state these rows need: its layers off ("off": base and stacked
        adapters' rows), or one of its adapters active. Switching costs tens of ms on the 135M
        model (measured), so the state only changes when the batch's make-up does."""
        if mode == self._mode:
            return
        if mode == "off":
            self.peft.base_model.disable_adapter_layers()
        else:
            if self._mode in ("off", None):
                self.peft.base_model.enable_adapter_layers()
            if self.peft.active_adapter != mode:
                self.peft.set_adapter(mode)
        self._mode = mode

    @torch.no_grad()
    def forward(self, names: list[str | None], **inputs) -> torch.Tensor:
        """Next-token logits [rows, vocab] (float32); with logits_to_keep=0 every position's logits
        [rows, columns, vocab] in the model's dtype. names[i] is row i's adapter (None: the base);
        the rows are all mixable, or all of one non-mixable adapter."""
        kinds = set(names)
        solo = [n for n in kinds if n is not None and not self.kinds[n]]
        if solo and len(kinds) > 1:
            raise ModelError(f"adapter {solo[0]} cannot share a batch with other adapters")
        if solo:
            self._route(solo[0])
            out = self.peft(**inputs)
        else:
            if self.peft is not None:
                self._route("off")
            ids = inputs["input_ids"]
            with self.multi.rows(names, ids.shape[1], ids.device):
                out = self.model(**inputs)
        if inputs.get("logits_to_keep") == 0:  # every position (prompt log-probabilities), as computed
            return out.logits
        return out.logits[:, -1, :].float()


def _strip_adapter_layers(model) -> None:
    """Put back the plain layers a failed PeftModel.from_pretrained left wrapped in the base."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, child_name, child.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
