"""What the training loop trains on: a task gives batches, a loss, an evaluation, calibration data.

The loop (:mod:`slimtune.train.loop`) knows nothing else about the model or the data. A task has:

- ``prepare_model(model, seed)``: the model to train (the classifier puts a head on an encoder);
  ``full_train_modules``: names of its modules that train in full next to an adapter.
- ``next_batch(n)``: the next ``n`` examples of the seeded training order; ``state_dict()`` /
  ``load_state_dict()`` save and restore the position in that order (for resuming).
- ``loss(model, batch)``: the mean loss of a batch; ``evaluate(model)``: held-out metrics.
- ``calibration(n, seed, data=None)``: ``[n, seqlen]`` token windows for data-driven adapter
  methods (of the task's own training data, or of text data set or text file ``data``'s train
  split).

:class:`CausalLMTask` -- next-token prediction on random windows of ``seqlen`` tokens of a text
data set's or UTF-8 text file's train split (:func:`slimtune.data.load_text`); evaluation is
:func:`slimtune.evaluate.perplexity` on the first ``eval_tokens`` tokens of the test split (and
of the ``also_eval`` splits, e.g. PTB's ``valid``, as ``<split>_perplexity``).
:class:`ClassificationTask` -- cross-entropy of a
:class:`~slimtune.train.classifier.SequenceClassifier` on reviews truncated to ``seqlen`` tokens;
evaluation is :func:`slimtune.evaluate.accuracy` on the first ``eval_examples`` test reviews.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.calib import calibration_windows, sample_windows
from slimtune.evaluate import accuracy, model_device, perplexity, tokenize_text
from slimtune.models import is_causal_lm
from slimtune.train.classifier import SequenceClassifier
from slimtune.train.config import TrainConfig

EVAL_BATCH = 32


class EpochOrder:
    """An endless training order: epoch ``e`` is ``make_epoch(generator seeded by (seed, e))``, a
    1-D LongTensor of item ids. The position ``(epoch, position)`` is the whole state."""

    def __init__(self, make_epoch: Callable[[torch.Generator], torch.Tensor], seed: int):
        self.make_epoch, self.seed = make_epoch, seed
        self.epoch, self.position, self._order = 0, 0, None

    def _current(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = self.make_epoch(g)
            if self._order.numel() == 0:
                raise ValueError("an epoch of the training order is empty")
        return self._order

    def take(self, n: int) -> torch.Tensor:
        parts = []
        while n > 0:
            order = self._current()
            part = order[self.position:self.position + n]
            parts.append(part)
            self.position += part.numel()
            n -= part.numel()
            if self.position == order.numel():
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


_SPLIT_IDS: dict[tuple, torch.Tensor] = {}


def split_ids(tokenizer, data: str, split: str) -> torch.Tensor:
    """Token ids of a text split (:func:`slimtune.evaluate.tokenize_text`), cached per tokenizer
    (its path and vocabulary size) and text source (a registered name, or a text file's resolved
    path, modification time and size), so runs in one process tokenize a split once. Read-only."""
    from slimtune.data import load_text, text_source_key

    key = (getattr(tokenizer, "name_or_path", None) or id(tokenizer), len(tokenizer),
           text_source_key(data), split)
    if key not in _SPLIT_IDS:
        text = load_text(data, split)
        if len(_SPLIT_IDS) >= 8:
            _SPLIT_IDS.pop(next(iter(_SPLIT_IDS)))
        _SPLIT_IDS[key] = tokenize_text(tokenizer, text)
    return _SPLIT_IDS[key]


def describe_source(data: str) -> str:
    """How messages name a text source: ``austen``, or ``text file <path as given>``."""
    from slimtune.data import is_text_file

    return f"text file {data}" if is_text_file(data) else data


def describe_split(data: str, split: str) -> str:
    """How messages name a split: ``austen/train``, or ``the train split of text file <path>``."""
    source = describe_source(data)
    return f"the {split} split of {source}" if source != data else f"{data}/{split}"


class CausalLMTask:
    """Causal-LM fine-tuning on text data set or UTF-8 text file ``data`` (see the module
    docstring)."""

    full_train_modules: tuple[str, ...] = ()

    def __init__(self, tokenizer, data: str, seqlen: int, eval_tokens: int, seed: int = 0,
                 eval_batch: int = 4, also_eval: tuple[str, ...] = ()):
        self.tokenizer, self.data, self.seqlen = tokenizer, data, seqlen
        self.eval_batch = eval_batch
        self.also_eval = {split: split_ids(tokenizer, data, split)[:eval_tokens]
                          for split in also_eval}
        self.train_ids = split_ids(tokenizer, data, "train")
        if self.train_ids.numel() < 2 * seqlen:
            raise ValueError(f"{describe_split(data, 'train')} has {self.train_ids.numel()} "
                             f"tokens: too few for training windows of seqlen {seqlen} (it "
                             f"needs at least {2 * seqlen})")
        self.test_ids = split_ids(tokenizer, data, "test")[:eval_tokens]
        if self.test_ids.numel() < seqlen:
            raise ValueError(f"{describe_split(data, 'test')} has {self.test_ids.numel()} "
                             f"tokens: fewer than one window of seqlen {seqlen}")
        self.order = EpochOrder(self._epoch_starts, seed)

    def _epoch_starts(self, g: torch.Generator) -> torch.Tensor:
        """Window starts of one epoch: a random offset in [0, seqlen), then every slot of
        ``seqlen`` tokens after it once, in random order."""
        offset = int(torch.randint(0, self.seqlen, (1,), generator=g))
        slots = (self.train_ids.numel() - offset) // self.seqlen
        return offset + torch.randperm(slots, generator=g) * self.seqlen

    def prepare_model(self, model: nn.Module, seed: int = 0) -> nn.Module:
        if not is_causal_lm(model):
            raise ValueError(f"{describe_source(self.data)} is causal-LM training: the model "
                             f"must be a causal language model (e.g. smollm2-135m), got "
                             f"{type(model).__name__}")
        return model

    def next_batch(self, n: int) -> dict:
        starts = self.order.take(n)
        return {"input_ids": torch.stack([self.train_ids[s:s + self.seqlen] for s in starts.tolist()])}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"].to(model_device(model))
        logits = model(input_ids=ids, use_cache=False).logits
        targets = torch.roll(ids, shifts=-1, dims=1)
        targets[:, -1] = -100  # the last position has no next token
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=-100)

    def evaluate(self, model: nn.Module) -> dict:
        result = perplexity(model, self.test_ids, seqlen=self.seqlen, batch_size=self.eval_batch,
                            progress=False)
        scores = {"perplexity": result["perplexity"], "nll": result["nll"],
                  "tokens": result["tokens"]}
        for split, ids in self.also_eval.items():
            scores[f"{split}_perplexity"] = perplexity(
                model, ids, seqlen=self.seqlen, batch_size=self.eval_batch,
                progress=False)["perplexity"]
        return scores

    def calibration(self, n: int, seed: int, data: str | None = None) -> torch.Tensor:
        return calibration_windows(self.tokenizer, data=data or self.data, split="train", n=n,
                                   seqlen=self.seqlen, seed=seed)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class ClassificationTask:
    """Sequence classification on data set ``data`` (see the module docstring)."""

    full_train_modules: tuple[str, ...] = ("head",)

    def __init__(self, tokenizer, data: str, seqlen: int, eval_examples: int, seed: int = 0):
        from slimtune.data import load_classification

        self.tokenizer, self.data, self.seqlen = tokenizer, data, seqlen
        self.texts, self.labels = load_classification(data, "train")
        test_texts, test_labels = load_classification(data, "test")
        self.test_texts, self.test_labels = test_texts[:eval_examples], test_labels[:eval_examples]
        self.n_classes = max(self.labels) + 1
        n = len(self.texts)
        self.order = EpochOrder(lambda g: torch.randperm(n, generator=g), seed)

    def prepare_model(self, model: nn.Module, seed: int = 0) -> nn.Module:
        if is_causal_lm(model):
            raise ValueError(f"{self.data} is sequence classification: the model must be an "
                             f"encoder (e.g. minilm-l6), got {type(model).__name__}")
        return SequenceClassifier(model, self.n_classes, seed=seed)

    def _encode(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.seqlen,
                                   return_tensors="pt"))

    def next_batch(self, n: int) -> dict:
        idx = self.order.take(n).tolist()
        batch = self._encode([self.texts[i] for i in idx])
        batch["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = model_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return F.cross_entropy(model(**inputs).logits, batch["labels"].to(device))

    def evaluate(self, model: nn.Module) -> dict:
        return accuracy(model, self.tokenizer, self.test_texts, self.test_labels,
                        batch_size=EVAL_BATCH, max_length=self.seqlen)

    def calibration(self, n: int, seed: int, data: str | None = None) -> torch.Tensor:
        """Windows of the training reviews joined into one token stream (or of text ``data``'s
        train split)."""
        if data is not None:
            return calibration_windows(self.tokenizer, data=data, split="train", n=n,
                                       seqlen=self.seqlen, seed=seed)
        return sample_windows(tokenize_text(self.tokenizer, "\n".join(self.texts)), n,
                              self.seqlen, seed, random_offset=False,
                              source=f"{self.data}/train reviews")

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def build_task(config: TrainConfig, tokenizer):
    """The task ``config.data`` names, with the config's window, evaluation size and seed."""
    if config.is_classification:
        return ClassificationTask(tokenizer, config.data, config.window, config.eval_examples,
                                  seed=config.seed)
    return CausalLMTask(tokenizer, config.data, config.window, config.eval_tokens,
                        seed=config.seed, eval_batch=config.batch)
