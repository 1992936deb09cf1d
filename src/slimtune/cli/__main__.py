"""``python -m slimtune.cli``: the same as the ``slimtune`` command."""
from slimtune.cli import app

app()
