"""The training run's settings, validated before anything is loaded.

``batch`` is the micro-batch (windows or reviews per forward pass); one optimiser step sees
``batch * grad_accum`` of them. ``seqlen`` is the window length of causal-LM training and the
truncation length of classification (default 128 tokens there). ``eval_every`` / ``save_every``
count optimiser steps; 0 means "only at the end" / "never". ``warmup`` is a number of optimiser
steps (see :mod:`slimtune.train.schedule`).

``data`` is a registered text data set (causal-LM training on its train split, perplexity on its
test split), a classification data set, or a path to a UTF-8 text file (causal-LM training on the
file's train split, perplexity on its test split; see :mod:`slimtune.data`); ``calib_data`` is a
registered text data set or a text file. A path is kept as given (not made absolute), so a resume
compares it as typed; the file is checked (exists, UTF-8, holds text, has the splits used) here,
before any model is loaded.
"""
from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimtune.data import (CLASSIFICATION_DATASETS, TEXT_DATASETS, DataNotFoundError,
                           UnknownTextSourceError, check_text_source)
from slimtune.registry import validate
from slimtune.train.hooks import make_hooks
from slimtune.train.optimizers import OPTIMIZERS
from slimtune.train.optimizers.config import AdamKeys

LM_SEQLEN, CLASSIFICATION_SEQLEN = 256, 128
MAX_CLASSIFICATION_SEQLEN = 512  # BERT-family position embeddings
# Changing these between a checkpoint and its resume does not change the result.
RESUME_FREE_FIELDS = frozenset({"eval_every", "save_every"})
TEXT_FILE_CHOICE = "a UTF-8 text file path"


def _check_text_file(value: str, splits: tuple[str, ...], unknown: str) -> None:
    """Raise a ``ValueError`` (what a validator may raise) unless text file ``value`` has every
    split of ``splits``; ``unknown`` is the message for a value that is no file or path at all."""
    try:
        for split in splits:
            check_text_source(value, split)
    except UnknownTextSourceError:
        raise ValueError(unknown) from None
    except DataNotFoundError as error:  # a FileNotFoundError, which pydantic would not catch
        raise ValueError(str(error)) from None


class TrainConfig(BaseModel):
    """Settings of one fine-tuning run (adapter or full); every field is checked on creation."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="text data set (causal-LM training: austen, ptb), "
                                  "classification data set (finefoods) or a UTF-8 text file "
                                  "path (causal-LM training)")
    steps: int = Field(100, ge=1, description="optimiser steps")
    batch: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    seqlen: int | None = Field(None, ge=2, description="tokens per window (LM, default 256) or "
                                                       "truncation length (classification, "
                                                       "default 128)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    warmup: int = Field(0, ge=0, description="linear-warmup steps before the cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm "
                                                              "to this (None: no clipping)")
    eval_every: int = Field(0, ge=0, description="evaluate every K steps (0: only at the end)")
    eval_tokens: int = Field(8192, ge=2, description="LM: score the first N test-split tokens")
    eval_examples: int = Field(256, ge=1, description="classification: first N test reviews")
    save_every: int = Field(0, ge=0, description="checkpoint every K steps (0: never)")
    seed: int = Field(0, description="seeds the data order, the head and torch's global RNG")
    optimizer: str = Field("adamw", description="optimiser (slimtune.train.optimizers: adamw, "
                                                "galore, fira, lion, sam, asam, gam, fsam, "
                                                "cautious, grams, mars)")
    optimizer_params: dict = Field(default_factory=dict, description="the optimiser's own keys "
                                   "(e.g. rank, update_proj_gap for galore)")
    hooks: list[dict] = Field(default_factory=list, description="training hooks, each "
                              "{method: name, **keys} (slimtune.train.hooks: trp, "
                              "group_sparsity, temporary_forgetting, weight_compander)")
    calib_n: int = Field(64, ge=1, description="calibration windows for data-driven methods")
    calib_data: str | None = Field(None, description="text data set (austen, ptb) or UTF-8 "
                                   "text file path whose train split calibrates data-driven "
                                   "methods (None: the training data), e.g. CorDA's "
                                   "knowledge-preserved mode on the knowledge to keep")

    @field_validator("data")
    @classmethod
    def _known_data(cls, value: str) -> str:
        known = [*TEXT_DATASETS, *CLASSIFICATION_DATASETS]
        if value not in known:
            _check_text_file(value, ("train", "test"), f"unknown data set {value!r}; valid: "
                                   f"{', '.join(known)} or {TEXT_FILE_CHOICE}")
        return value

    @field_validator("calib_data")
    @classmethod
    def _known_calib_data(cls, value: str | None) -> str | None:
        if value is not None and value not in TEXT_DATASETS:
            _check_text_file(value, ("train",), f"unknown calibration text {value!r}; "
                                   f"valid: {', '.join(TEXT_DATASETS)} or {TEXT_FILE_CHOICE}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {value}")
        return value

    @field_validator("hooks")
    @classmethod
    def _known_hooks(cls, value: list[dict]) -> list[dict]:
        names = [spec.get("method") for spec in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"hook {twice[0]!r} is given twice")
        make_hooks(value)
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(OPTIMIZERS.unknown(value))
        return value

    def optimizer_keys(self) -> dict:
        """The optimiser's keys: ``lr`` and ``weight_decay`` (and, for Adam-based ones,
        ``betas`` and ``eps``) from this config, then ``optimizer_params`` over them."""
        keys = {"lr": self.lr, "weight_decay": self.weight_decay}
        if issubclass(OPTIMIZERS.get(self.optimizer).config, AdamKeys):
            keys.update(betas=self.betas, eps=self.eps)
        return {**keys, **self.optimizer_params}

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup}) exceeds steps ({self.steps})")
        if self.is_classification and self.window > MAX_CLASSIFICATION_SEQLEN:
            raise ValueError(f"seqlen {self.window} exceeds the encoder's "
                             f"{MAX_CLASSIFICATION_SEQLEN} positions")
        OPTIMIZERS.make_config(self.optimizer, "optimizer", **self.optimizer_keys())
        if not self.is_classification and self.eval_tokens < self.window:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) must hold at least one window "
                             f"of seqlen {self.window}")
        return self

    @property
    def is_classification(self) -> bool:
        """A registered classification data set; a text file never is one."""
        return self.data in CLASSIFICATION_DATASETS

    @property
    def window(self) -> int:
        """``seqlen`` with the task's default filled in."""
        if self.seqlen is not None:
            return self.seqlen
        return CLASSIFICATION_SEQLEN if self.is_classification else LM_SEQLEN

    def resume_mismatch(self, saved: dict) -> list[str]:
        """Fields (other than :data:`RESUME_FREE_FIELDS`) that differ from a checkpoint's."""
        now = self.model_dump(mode="json")
        return sorted(k for k in set(now) | set(saved)
                      if k not in RESUME_FREE_FIELDS and now.get(k) != saved.get(k))


def make_train_config(method: str | None = None, key: Callable[[str], str] = str,
                      **fields) -> TrainConfig:
    """``TrainConfig(**fields)``, or a :class:`slimtune.registry.ConfigError` (a ``ValueError``)
    with one ``training (<method>): <key>: <problem>`` line per problem; ``method`` (the adapter
    method, or ``full``) and ``key`` (how a field is named, e.g. as a CLI flag) only word it."""
    return validate(TrainConfig, fields, "training", method, key)
