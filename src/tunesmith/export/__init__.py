"""`tunesmith export RUN --format adapter|merged|gguf --out DIR`.

Every format is written into a hidden staging folder beside DIR and renamed into place when
complete, so a failure or Ctrl-C never leaves an export that looks usable. DIR/export.json says
what was exported from which run and base model, with a checksum of every file.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from tunesmith.atomic import atomic_dir
from tunesmith.errors import ModelError
from tunesmith.export.gguf import OUTTYPES as GGUF_TYPES  # noqa: F401 (the CLI's list)


@contextmanager
def staged_dir(out: Path, force: bool):
    if out.exists() and not force:
        raise ModelError(f"{out} already exists; pass --force to replace it or choose another --out")
    # A failed --force keeps the old export: it is swapped out only once the new one is whole.
    with atomic_dir(out, if_exists="replace" if force else "error") as tmp:
        yield tmp
        _usual_permissions(tmp)


def _usual_permissions(root: Path) -> None:
    """Temporary files and folders are private (0600/0700); an export is read by other users too
    (Ollama's and vLLM's service accounts), so give it what the umask gives ordinary files."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _copy_adapter(run: Path, out: Path, options: dict) -> None:
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ModelError(f"{run} trained the whole model (no adapter/); export it with --format merged")
    for f in (run / "adapter").iterdir():
        if f.suffix in {".json", ".safetensors"}:
            shutil.copy2(f, out / f.name)
    for f in (run / "tokenizer").iterdir():  # PEFT, vLLM and TGI read the template next to the adapter
        shutil.copy2(f, out / f.name)


def _merged(run: Path, out: Path, options: dict) -> None:
    from tunesmith.export.merge import merge_run

    merge_run(run, out, options.get("dtype") or "float32")


def _gguf(run: Path, out: Path, options: dict) -> None:
    from tunesmith.export.gguf import check_outtype, write_gguf
    from tunesmith.export.merge import merge_run
    from tunesmith.export.modelfile import write_modelfile
    from tunesmith.models.load import load_tokenizer

    quants = options.get("quant") or ["q8_0"]
    for quant in quants:  # before merging: an unknown type, or a k-quant the gguf package cannot write
        check_outtype(quant)
    merged = out / ".merged"
    merged.mkdir()
    merge_run(run, merged, "float32")  # quantise from full precision, not from a 16-bit copy
    tokenizer = load_tokenizer(merged)
    files = {}
    for i, quant in enumerate(quants):
        files[quant] = write_gguf(merged, out / f"{run.name}-{quant}.gguf", quant)
        # one Modelfile per file; the plain name goes with the first type asked for
        write_modelfile(files[quant], tokenizer, out, name="Modelfile" if i == 0 else f"Modelfile.{quant}")
    if options.get("check"):
        from tunesmith.export.parity import parity, summary_line, table

        report = parity(run, formats=tuple(quants), merged_dir=merged, gguf_files=files)
        (out / "parity.json").write_text(json.dumps(report, indent=2))
        print(table(report) + "\n" + summary_line(report), flush=True)
    shutil.rmtree(merged)


FORMATS: dict[str, Callable[[Path, Path, dict], None]] = {"adapter": _copy_adapter, "merged": _merged,
                                                         "gguf": _gguf}


def _manifest(run: Path, fmt: str, out: Path, options: dict) -> dict:
    from tunesmith import __version__
    from tunesmith.models.registry import sha256_file

    base = json.loads((run / "manifest.json").read_text())["model"]
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    return {"format": fmt, "run": str(run.resolve()), "base_model": {"id": base["id"], "sha256": base["sha256"]},
            "options": {k: v for k, v in options.items() if v is not None}, "tunesmith": __version__, "files": files}


def export_run(run: str | Path, fmt: str, out: str | Path, force: bool = False, **options) -> Path:
    from tunesmith.generation import is_run_dir, refuse_reward_run

    run, out = Path(run), Path(out)
    if not is_run_dir(run):
        raise ModelError(f"{run} is not a finished run directory (manifest.json with adapter/ or model/)")
    refuse_reward_run(run)  # a score head, no LM head: nothing a GGUF or merged LM export could hold
    if fmt not in FORMATS:
        raise ModelError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    with staged_dir(out, force) as tmp:
        FORMATS[fmt](run, tmp, options)
        manifest = _manifest(run, fmt, tmp, options)
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    return out
