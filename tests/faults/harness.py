"""Run ``slimtune`` commands as real subprocesses and break them on purpose.

- :func:`cli` runs one command to the end; :func:`interrupt_at` starts one with the environment
  hook that makes it wait at a named point (``slimtune.io.atomic.fault_point``: the final rename
  of the directory ``out``, ``final-rename:<name>``), sends it a signal there and waits for it.
- :func:`snapshot` (relative path -> sha256 of every file under a directory, marker and volatile
  files left out; an output that is one file: its name -> its sha256) and :func:`leftovers`
  (the ``.OUT.tmp-*`` / ``.OUT.old-*`` an interrupted write leaves beside OUT) are what the
  tests compare.
- :func:`mount_tmpfs` mounts a small tmpfs (read-only or of a given size) where the kernel lets
  root do so, and says why not otherwise (the tests then skip with that reason).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAUSE_AT, PAUSE_FILE = "SLIMTUNE_TEST_PAUSE_AT", "SLIMTUNE_TEST_PAUSE_FILE"
VOLATILE = {"history.json", "slimtune.json", ".slimtune-output"}  # timings and markers


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (PAUSE_AT, PAUSE_FILE)}
    env.update(SLIMTUNE_PROGRESS_INTERVAL="5", **extra)
    return env


def cli(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python -m slimtune.cli ARGS`` from the repository root, to the end."""
    return subprocess.run([sys.executable, "-m", "slimtune.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=environment(**env))


def interrupt_at(args: list[str], point: str, sig: int, workdir: Path,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``args`` until it waits at ``point``, send ``sig``, return the finished process.

    Fails (AssertionError) if the command ends without reaching the point."""
    ready = workdir / f"paused-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "slimtune.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(**{PAUSE_AT: point, PAUSE_FILE: str(ready)}))
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended (rc {proc.returncode}) before reaching {point}:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"did not reach {point} within {timeout} s")
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)  # a loaded 2-core machine can take > 60 s to exit
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def killed(proc: subprocess.CompletedProcess, sig: int = signal.SIGKILL) -> bool:
    return proc.returncode == -sig


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def snapshot(path: Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` of the files under ``path`` (None if it does not exist),
    without :data:`VOLATILE` files."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():  # an output that is one file
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*"))
            if f.is_file() and f.name not in VOLATILE and ".tmp-" not in f.name}


def leftovers(out: Path) -> list[str]:
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")))


def mount_tmpfs(target: Path, options: str) -> str | None:
    """Mount a tmpfs at ``target`` with ``options`` (e.g. ``"ro"``, ``"size=1m"``); None on
    success, else the reason it could not be done here."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"the kernel refused to mount a tmpfs ({proc.stderr.strip() or proc.returncode})"
    return None


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)
