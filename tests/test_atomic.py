"""atomic_dir / atomic_file: the one writer behind every output; it never replaces what
slimtune did not write, and cleans up (and reports) what an interrupted write left behind."""
import pytest

import slimtune.io.atomic as atomic
from slimtune.io.atomic import MARKER, NotOurDirectoryError, atomic_dir, mark


def names(path):
    return sorted(p.name for p in path.iterdir())


def test_new_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert names(out) == [MARKER, "a.txt"]


def test_existing_directory_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:  # an empty directory may be replaced
        (tmp / "b.txt").write_text("b")
    assert names(out) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_keeps_the_old_directory_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    mark(out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert names(out) == [MARKER, "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    """Where no atomic exchange is possible the old directory is set aside, and put back when
    the final rename fails."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    mark(out)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real_replace = atomic.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert names(out) == [MARKER, "old.txt"]
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


def test_a_directory_slimtune_did_not_write_is_never_replaced(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    with pytest.raises(NotOurDirectoryError, match=f"slimtune did not write it.*{MARKER}"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("x")
    assert names(out) == ["chapter1.tex"] and names(tmp_path) == ["thesis"]
    (tmp_path / "file").write_text("f")
    with pytest.raises(NotOurDirectoryError, match="not a directory"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass


def test_replacing_swaps_in_one_step_so_out_is_never_missing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    seen = []
    real_exchange = atomic.exchange
    monkeypatch.setattr(atomic, "exchange", lambda a, b: seen.append(
        (a.exists(), (b / "v").read_text())) or real_exchange(a, b))
    monkeypatch.setattr(atomic.os, "replace", lambda *a: pytest.fail("two-step rename used"))
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert seen == [(True, "1")] and (out / "v").read_text() == "2"
    assert names(tmp_path) == ["out"]


def test_leftovers_of_a_killed_write_are_removed_and_reported(tmp_path, capsys):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    (tmp_path / ".out.tmp-abc123").mkdir()  # a killed write's half-built directory
    (tmp_path / ".out.tmp-abc123" / "half").write_text("h")
    (tmp_path / ".other.tmp-zzz").mkdir()  # belongs to another output: left alone
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert names(tmp_path) == [".other.tmp-zzz", "out"] and (out / "v").read_text() == "2"
    err = capsys.readouterr().err
    assert "removed" in err and ".out.tmp-abc123" in err and "interrupted" in err


def test_an_old_output_set_aside_by_a_killed_write_is_restored(tmp_path, capsys):
    """A kill between setting the old directory aside and renaming the new one in (the
    fallback without an atomic exchange) loses nothing: the next write puts it back first."""
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-k1ll3d"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "v").write_text("old")
    mark(aside / "out")
    with pytest.raises(FileExistsError):  # restored, so a plain write must not replace it
        with atomic_dir(out):
            pass
    assert (out / "v").read_text() == "old" and names(tmp_path) == ["out"]
    assert "restored" in capsys.readouterr().err


def test_check_output_file_refuses_what_it_must_not_replace(tmp_path):
    from slimtune.io.outputs import OutputError, check_output_file

    out = tmp_path / "m.gguf"
    assert check_output_file(out, 1000) == out  # a new file in a writable directory
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path / "d.gguf")
    out.write_bytes(b"user data")
    with pytest.raises(OutputError, match="already exists"):
        check_output_file(out, magic=b"GGUF")
    with pytest.raises(OutputError, match="slimtune did not write it"):
        check_output_file(out, overwrite=True, magic=b"GGUF")
    out.write_bytes(b"GGUF\x03\x00")
    assert check_output_file(out, overwrite=True, magic=b"GGUF") == out
    with pytest.raises(OutputError, match="is not a directory"):
        check_output_file(out / "x.gguf")
    with pytest.raises(OutputError, match="MB are free"):
        check_output_file(tmp_path / "new.gguf", needed_bytes=2 ** 62)
    assert out.read_bytes() == b"GGUF\x03\x00"  # checks never touch the file
