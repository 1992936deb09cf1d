"""slimtune.progress: rich bars on a terminal, timestamped lines elsewhere, settings, notes."""
import io
import re
import sys

import pytest

from slimtune import progress
from slimtune.progress import LineProgress, configure, note, progress_bar, reset_config, warn

STAMP = r"\[\d\d:\d\d:\d\d\] "
FILE_STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    monkeypatch.delenv("SLIMTUNE_PROGRESS_INTERVAL", raising=False)
    reset_config()
    yield
    reset_config()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


def err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_non_tty_stderr_gets_lines_with_count_rate_elapsed_and_eta(capsys, clock):
    configure(interval=0)  # pytest's captured stderr is not a terminal: line mode by itself
    bar, task = progress_bar(4, "work")
    assert isinstance(bar, LineProgress)
    with bar:
        clock.now += 10
        bar.advance(task)
        clock.now += 10
        bar.advance(task, 2)
    lines = err_lines(capsys)
    assert len(lines) == 2
    assert re.fullmatch(STAMP + r"work: 1/4 \(25%\), 0\.1 it/s, elapsed 0:00:10, ETA 0:00:30",
                        lines[0]), lines
    assert re.fullmatch(STAMP + r"work: 3/4 \(75%\), 0\.15 it/s, elapsed 0:00:20, ETA 0:00:06",
                        lines[1]), lines


def test_final_line_at_exit_and_at_finish(capsys, clock):
    configure(interval=30)
    bar, task = progress_bar(4, "layers")
    with bar:
        clock.now += 1
        bar.advance(task)
        bar.advance(task)
        assert err_lines(capsys) == []  # inside the interval: nothing yet
    lines = err_lines(capsys)
    assert len(lines) == 1 and "layers: 2/4 (50%)" in lines[0] and "elapsed 0:00:01" in lines[0]

    bar, task = progress_bar(3, "windows")
    with bar:
        clock.now += 3
        bar.advance(task, 3)  # reaching the total prints at once, even inside the interval
        lines = err_lines(capsys)
        assert len(lines) == 1 and "windows: 3/3 (100%)" in lines[0] and "ETA 0:00:00" in lines[0]
    assert err_lines(capsys) == []  # nothing changed since: no second line at exit


def test_description_updates_show_up(capsys, clock):
    configure(interval=0)
    bar, task = progress_bar(100, "train")
    with bar:
        clock.now += 38
        bar.update(task, advance=12, description="train loss 3.8123 lr 2.00e-04")
    (line,) = err_lines(capsys)
    assert re.fullmatch(STAMP + r"train loss 3\.8123 lr 2\.00e-04: 12/100 \(12%\), 0\.316 it/s, "
                        r"elapsed 0:00:38, ETA 0:04:38", line), line


def test_update_completed_sets_a_starting_point_not_speed(capsys, clock):
    configure(interval=0)
    bar, task = progress_bar(100, "train")
    bar.update(task, completed=40)  # a resumed run: before ``with`` like the training loop
    capsys.readouterr()
    with bar:
        clock.now += 10
        bar.update(task, advance=1)
    (line,) = err_lines(capsys)
    assert "train: 41/100 (41%), 0.1 it/s, elapsed 0:00:10, ETA 0:09:50" in line


def test_second_task_prints_only_when_it_advanced(capsys, clock):
    configure(interval=0)
    bar, blocks = progress_bar(2, "blocks")
    batches = bar.add_task("batches", total=8)
    assert isinstance(batches, int) and batches != blocks
    with bar:
        clock.now += 1
        bar.advance(batches, 4)
        lines = err_lines(capsys)
        assert len(lines) == 1 and "batches: 4/8 (50%)" in lines[0]
        bar.advance(blocks)
        lines = err_lines(capsys)
        assert len(lines) == 1 and "blocks: 1/2 (50%)" in lines[0]


def test_throttle_prints_each_changed_task_once_per_interval(capsys, clock):
    configure(interval=30)
    bar, blocks = progress_bar(10, "blocks")
    batches = bar.add_task("batches", total=100)
    with bar:
        clock.now += 31
        bar.advance(batches)
        bar.advance(blocks)
        clock.now += 1
        bar.advance(batches)
        clock.now += 1
        bar.advance(batches)
        lines = err_lines(capsys)
        assert len(lines) == 1 and "batches: 1/100" in lines[0]  # 3 advances in one interval
        clock.now += 30
        bar.advance(batches)
        lines = err_lines(capsys)  # both tasks changed since the last line: one line each
        assert len(lines) == 2
        assert "blocks: 1/10 (10%)" in lines[0] and "batches: 4/100 (4%)" in lines[1]


def test_reset_restarts_count_clock_and_description(capsys, clock):
    configure(interval=0)
    bar, task = progress_bar(4, "batches")
    with bar:
        clock.now += 100
        bar.advance(task, 4)
        bar.reset(task, total=8, description="block 3: outputs")
        clock.now += 2
        bar.advance(task)
    lines = err_lines(capsys)
    assert "batches: 4/4 (100%)" in lines[0]
    assert re.fullmatch(STAMP + r"block 3: outputs: 1/8 \(12%\), 0\.5 it/s, elapsed 0:00:02, "
                        r"ETA 0:00:14", lines[-1]), lines


def test_a_reused_task_filling_up_waits_for_the_interval(capsys, clock):
    configure(interval=30)
    bar, task = progress_bar(2, "batches")
    with bar:
        for i in range(3):  # one sub-loop per block, as the calibration pipeline does
            bar.reset(task, total=2, description=f"block {i}: outputs")
            clock.now += 1
            bar.advance(task, 2)
        assert err_lines(capsys) == []
    (line,) = err_lines(capsys)
    assert "block 2: outputs: 2/2 (100%)" in line


def test_disabled_and_quiet_bars_print_nothing(capfd, clock, tmp_path):
    configure(interval=0, log_file=tmp_path / "run.log")
    bar, task = progress_bar(3, "hidden", enabled=False)
    with bar:
        bar.advance(task)
        bar.update(task, advance=2, description="still hidden")
    configure(quiet=True)
    for lines in (True, False):
        configure(lines=lines)
        bar, task = progress_bar(3, "quiet")
        with bar:
            bar.advance(task, 3)
    assert capfd.readouterr().err == ""
    logged = (tmp_path / "run.log").read_text()
    assert "hidden" not in logged  # enabled=False: silent everywhere
    assert "quiet: 3/3 (100%)" in logged  # quiet silences stderr; the log file still gets progress


def test_note_respects_quiet_and_warn_does_not(capsys):
    note("resumed from step 40")
    warn("disk almost full")
    assert capsys.readouterr().err == "resumed from step 40\nwarning: disk almost full\n"
    configure(quiet=True)
    note("removed leftover temporary directory /tmp/x")
    warn("still shown")
    assert capsys.readouterr().err == "warning: still shown\n"


def test_log_file_gets_timestamped_lines_and_notes_in_rich_mode(capsys, clock, tmp_path):
    from rich.progress import Progress

    path = tmp_path / "run.log"
    path.write_text("earlier run\n")
    configure(lines=False, log_file=path, interval=0)
    bar, task = progress_bar(4, "singular values")
    second = bar.add_task("batches", total=2)
    assert isinstance(bar._rich, Progress)  # the rich bars are drawn as well
    with bar:
        clock.now += 2
        bar.advance(task)
        bar.update(second, advance=2, description="batches done")
        note("resumed from step 40")
        warn("odd")
    assert [t.completed for t in bar._rich.tasks] == [1, 2]
    assert "singular values" not in capsys.readouterr().err  # the lines go to the file only
    reset_config()  # closes the file
    logged = path.read_text().splitlines()
    assert logged[0] == "earlier run"  # appended, not overwritten
    assert re.fullmatch(FILE_STAMP + r"singular values: 1/4 \(25%\), 0\.5 it/s, elapsed 0:00:02, "
                        r"ETA 0:00:06", logged[1]), logged
    assert re.fullmatch(FILE_STAMP + r"batches done: 2/2 \(100%\).*", logged[2]), logged
    assert re.fullmatch(FILE_STAMP + "resumed from step 40", logged[3]), logged
    assert re.fullmatch(FILE_STAMP + "warning: odd", logged[4]), logged


def test_log_file_gets_lines_in_line_mode_too(capsys, clock, tmp_path):
    configure(lines=True, log_file=tmp_path / "run.log", interval=0)
    bar, task = progress_bar(2, "fisher")
    with bar:
        bar.advance(task)
    assert "fisher: 1/2 (50%)" in capsys.readouterr().err
    assert re.match(FILE_STAMP + r"fisher: 1/2 \(50%\)", (tmp_path / "run.log").read_text())


def test_terminal_without_log_file_gets_the_plain_rich_bar():
    from rich.progress import Progress

    configure(lines=False)
    bar, task = progress_bar(5, "train")
    assert isinstance(bar, Progress) and bar.tasks[task].total == 5


def test_the_mode_follows_isatty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert not isinstance(progress_bar(1, "x")[0], LineProgress)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(1, "x")[0], LineProgress)


def test_stderr_is_looked_up_at_write_time(monkeypatch, clock):
    configure(interval=0)
    bar, task = progress_bar(2, "late")
    sink = io.StringIO()
    monkeypatch.setattr(sys, "stderr", sink)
    with bar:
        bar.advance(task)
    assert "late: 1/2 (50%)" in sink.getvalue()


def test_interval_from_environment_at_call_time(monkeypatch):
    assert progress_bar(1, "x")[0].interval == 30
    monkeypatch.setenv("SLIMTUNE_PROGRESS_INTERVAL", "5")
    assert progress_bar(1, "x")[0].interval == 5
    monkeypatch.setenv("SLIMTUNE_PROGRESS_INTERVAL", "soon")
    assert progress_bar(1, "x")[0].interval == 30
    configure(interval=2)
    assert progress_bar(1, "x")[0].interval == 2
    with pytest.raises(ValueError):
        configure(interval=-1)


def test_eta_unknown_before_any_speed(capsys, clock):
    configure(interval=0)
    bar, task = progress_bar(4, "slow")
    with bar:
        bar.update(task, description="slow start")
    assert "slow start: 0/4 (0%), 0 it/s, elapsed 0:00:00, ETA ?" in capsys.readouterr().err


def test_a_library_loop_prints_lines_when_piped(capsys):
    import torch.nn as nn

    from slimtune.analyze.spectra import layer_spectra

    configure(interval=0)
    layer_spectra(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), progress=True)
    lines = err_lines(capsys)
    assert lines and "singular values: 2/2 (100%)" in lines[-1]
    layer_spectra(nn.Sequential(nn.Linear(8, 8)), progress=False)
    assert capsys.readouterr().err == ""
