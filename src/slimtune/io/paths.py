"""How a value the user typed is told apart: meant as a path, or as a registered name."""
from __future__ import annotations

from pathlib import Path


def looks_like_path(value: str) -> bool:
    """A separator, a leading ``~`` or ``.``, or a suffix (``book.txt``): a path that is missing,
    not an unknown registered name."""
    return ("/" in value or "\\" in value or value.startswith(("~", "."))
            or Path(value).suffix != "")
