"""The one write-to-temporary, fsync, rename, clean-up helper (tunesmith.atomic)."""
import os
import stat

import pytest

from tunesmith import atomic


def listing(d):
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_file_appears_whole_with_the_umask_permissions(tmp_path, umask_022):
    path = tmp_path / "sub" / "out.json"  # the parent is created
    atomic.write_json(path, {"a": "é"})
    assert path.read_text(encoding="utf-8") == '{\n  "a": "é"\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as open() would make it, not mkstemp's 0600
    assert listing(path.parent) == ["out.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(error):
        with atomic.atomic_write(path) as f:
            f.write("half of the new")
            f.flush()
            assert path.read_text() == "old"  # never visible under the real name before the end
            raise error()
    assert path.read_text() == "old" and listing(tmp_path) == ["out.txt"]
    with pytest.raises(error):
        with atomic.atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            raise error()
    assert listing(tmp_path) == ["out.txt"]


def test_path_form_replaces_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    with atomic.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.") and tmp.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and listing(tmp_path) == ["model.gguf"]
    assert synced[0].startswith(str(tmp_path / ".model.gguf.")) and synced[-1] == str(tmp_path)  # file, then dir


def test_binary_mode_and_no_appending(tmp_path):
    with atomic.atomic_write(tmp_path / "b", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="must start with 'w'"):
        with atomic.atomic_write(tmp_path / "b", "a"):
            pass


def test_directory_is_renamed_into_place_whole(tmp_path, umask_022):
    out = tmp_path / "export"
    with atomic.atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".export.") and not out.exists()
        (tmp / "a").mkdir()
        (tmp / "a" / "f.txt").write_text("1")
    assert (out / "a" / "f.txt").read_text() == "1" and listing(tmp_path) == ["export"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def old_export(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    return out


def write_new(out, error=None, **kwargs):
    with atomic.atomic_dir(out, **kwargs) as tmp:
        (tmp / "new.txt").write_text("new")
        if error:
            raise error()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_replace_keeps_the_old_directory(tmp_path, error):
    out = old_export(tmp_path)
    with pytest.raises(error):
        write_new(out, error, if_exists="replace")
    assert listing(out) == ["old.txt"] and listing(tmp_path) == ["export"]
    write_new(out, if_exists="replace")
    assert listing(out) == ["new.txt"] and listing(tmp_path) == ["export"]


def test_existing_directory_error_or_keep(tmp_path):
    out = old_export(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        write_new(out)
    write_new(out, if_exists="keep")  # another process made it meanwhile: theirs stays
    assert listing(out) == ["old.txt"] and listing(tmp_path) == ["export"]


def test_named_staging_is_adopted_and_kept_when_asked(tmp_path):
    stage = tmp_path / ".run.incomplete-1"
    stage.mkdir()
    (stage / "checkpoint").write_text("step 3")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(tmp_path / "run", staging=stage, keep_staging=lambda p: (p / "checkpoint").exists()) as t:
            assert t == stage and (t / "checkpoint").read_text() == "step 3"  # adopted as it is
            raise KeyboardInterrupt
    assert listing(tmp_path) == [".run.incomplete-1"]  # kept for --resume
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(tmp_path / "run", staging=stage, keep_staging=lambda p: False):
            raise RuntimeError
    assert listing(tmp_path) == []
