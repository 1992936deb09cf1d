"""The ``slimtune`` command line: the Typer app (:mod:`.app`) and one module per command, each
imported here once (that registers it; the order is the order of ``--help``)."""
from slimtune.cli import eval, inspect, compress, export, export_peft, adapt, pretrain, merge, compare  # noqa: F401  (registers them)
from slimtune.cli.app import app

__all__ = ["app"]
