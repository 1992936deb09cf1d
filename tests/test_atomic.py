"""atomic_dir: the one helper behind every directory the library writes."""
import pytest

from slimtune.io.atomic import atomic_dir


def test_new_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_existing_directory_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_keeps_the_old_directory_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    import slimtune.io.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = atomic.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_replaces_only_on_success(tmp_path):
    from slimtune.io.atomic import atomic_file

    path = tmp_path / "plots" / "table.json"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".json" and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError, match="halfway"):
        with atomic_file(path) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("halfway")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.json"]
