"""llama.cpp's own files from the llama-cpp-python sdist (the test dependency): the vocab-only
GGUF files of real model families (tests' tokenizers) and convert_hf_to_gguf.py with its gguf-py
(the reference GGUF converter). `make test` runs this once into .venv/llama.cpp.

    python tests/llama_vendor.py DEST
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # the llama-cpp-python pin in pyproject.toml's test extra
VOCABS = ("llama-bpe", "llama-spm", "qwen2", "phi-3")
KEEP = [f"models/ggml-vocab-{v}.gguf" for v in VOCABS] + ["convert_hf_to_gguf.py", "conversion/", "gguf-py/"]


def main(dest: Path) -> None:
    if (dest / "READY").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        staging = Path(tmp) / "out"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if rel and member.isfile() and any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP):
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        (staging / "READY").write_text(VERSION + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    print(f"llama.cpp {VERSION} vocab files and converter -> {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
