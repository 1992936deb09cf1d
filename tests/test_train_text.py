"""Training on a UTF-8 text file: the config accepts and checks it, the causal-LM task trains,
evaluates and calibrates on its splits (real SmolLM2, real Austen text written to files)."""
import copy
import math
import re

import pytest
import torch

from slimtune.adapt.registry import make_config
from slimtune.calib import calibration_windows
from slimtune.data import load_text
from slimtune.evaluate import tokenize_text
from slimtune.train import CausalLMTask, build_task, make_train_config, train
from slimtune.train.tasks import split_ids


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Two real text files of a few hundred lines each (Austen test text, different parts)."""
    folder = tmp_path_factory.mktemp("texts")
    text = load_text("austen", "test")
    book, other = folder / "book.txt", folder / "other.txt"
    book.write_text(text[:20000], encoding="utf-8")
    other.write_text(text[40000:60000], encoding="utf-8")
    return str(book), str(other)


# -- the config --------------------------------------------------------------------------------
def test_a_text_file_is_causal_lm_data_kept_as_given(text_files, tmp_path, monkeypatch):
    book, other = text_files
    config = make_train_config(data=book, steps=2, calib_data=other)
    assert config.data == book and config.calib_data == other
    assert not config.is_classification and config.window == 256
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.txt").write_text(open(book, encoding="utf-8").read(), encoding="utf-8")
    relative = make_train_config(data="local.txt", steps=2)
    assert relative.model_dump(mode="json")["data"] == "local.txt"  # not made absolute
    assert relative.resume_mismatch(relative.model_dump(mode="json")) == []


@pytest.mark.parametrize("content, reason", [
    (b"caf\xe9\n" * 20, r"is not valid UTF-8: .* at byte offset 3"),
    (b"", "holds no text"),
    (b"\n  \n\t" * 10, "holds no text"),
    (b"one\ntwo\nthree\nfour\nfive", r"has 5 lines: its test split \(the last tenth\) needs at "
                                     r"least 10"),
])
def test_a_bad_text_file_is_refused_with_its_reason(tmp_path, content, reason):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^training: data: text file .*bad\.txt {reason}$"):
        make_train_config(data=str(path), steps=2)


def test_a_missing_file_or_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^training: data: text file .*nope\.txt does not exist$"):
        make_train_config(data=str(tmp_path / "nope.txt"), steps=2)
    with pytest.raises(ValueError, match=r"calib_data: text file .* is not a file$"):
        make_train_config(data="austen", calib_data=str(tmp_path), steps=2)


def test_calibration_text_needs_only_a_train_split(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\nthree", encoding="utf-8")
    assert make_train_config(data="austen", calib_data=str(short)).calib_data == str(short)
    with pytest.raises(ValueError, match="has 3 lines"):
        make_train_config(data=str(short))


def test_unknown_names_list_only_what_the_field_takes():
    with pytest.raises(ValueError) as data_error:
        make_train_config(data="wikitext")
    assert str(data_error.value) == ("training: data: unknown data set 'wikitext'; valid: ptb, "
                                     "austen, finefoods-text, finefoods or a UTF-8 text file "
                                     "path")
    with pytest.raises(ValueError) as calib_error:
        make_train_config(data="austen", calib_data="wiki")
    message = str(calib_error.value)
    assert message == ("training: calib_data: unknown calibration text 'wiki'; valid: ptb, "
                       "austen, finefoods-text or a UTF-8 text file path")
    assert "finefoods," not in message and "finefoods or" not in message  # not the classifier
    with pytest.raises(ValueError, match="unknown calibration text 'finefoods'"):
        make_train_config(data="austen", calib_data="finefoods")  # classification, not text


# -- the task ----------------------------------------------------------------------------------
def test_lora_trains_on_a_text_file(smollm2, text_files, tmp_path):
    model, tok = smollm2
    book, _ = text_files
    config = make_train_config(data=book, steps=2, batch=1, seqlen=32, eval_tokens=64)
    task = build_task(config, tok)
    assert isinstance(task, CausalLMTask)
    assert torch.equal(task.test_ids, split_ids(tok, book, "test")[:64])
    _, history = train(copy.deepcopy(model), task, config, tmp_path / "run",
                       adapter=make_config("lora", r=2), progress=False)
    assert history["finished"] and len(history["steps"]) == 2
    assert all(math.isfinite(r["loss"]) for r in history["steps"])
    final = history["final_eval"]
    assert math.isfinite(final["perplexity"]) and final["perplexity"] > 1 and final["tokens"] > 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_calibration_on_another_text_file(smollm2, text_files):
    _, tok = smollm2
    book, other = text_files
    task = CausalLMTask(tok, book, seqlen=32, eval_tokens=64)
    windows = task.calibration(4, seed=3, data=other)
    assert windows.shape == (4, 32)
    assert torch.equal(windows, calibration_windows(tok, other, "train", 4, 32, 3))
    assert not torch.equal(windows, task.calibration(4, seed=3))  # the book's own windows


def test_token_cache_follows_the_file_content(smollm2, tmp_path):
    _, tok = smollm2
    path = tmp_path / "changing.txt"
    path.write_text("\n".join(f"first version, line {i}." for i in range(40)), encoding="utf-8")
    before = split_ids(tok, str(path), "train").clone()
    path.write_text("\n".join(f"the second and longer version, line {i}." for i in range(40)),
                    encoding="utf-8")
    after = split_ids(tok, str(path), "train")
    assert after.numel() > before.numel()
    assert torch.equal(after, tokenize_text(tok, load_text(str(path), "train")))


def test_a_file_too_short_for_two_windows_names_the_file(smollm2, tmp_path):
    _, tok = smollm2
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(f"line {i}" for i in range(12)), encoding="utf-8")
    expected = (rf"^the train split of text file {re.escape(str(path))} has \d+ tokens: too few "
                r"for training windows of seqlen 64 \(it needs at least 128\)$")
    with pytest.raises(ValueError, match=expected):
        CausalLMTask(tok, str(path), seqlen=64, eval_tokens=64)
