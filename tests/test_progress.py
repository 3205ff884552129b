"""progress.py: reporters show frames on stderr and never touch stdout."""

import io

import pytest
from rich.console import Console

from sfr_cli.progress import Reporter, RichReporter, SilentReporter


def stderr_console():
    return Console(file=io.StringIO(), width=160, color_system=None)


def run_render(reporter, total_frames=10, batch_frames=4):
    reporter.loading("loading checkpoints")
    reporter.note("source coefficients: first frame of coeffs.mat")
    reporter.start(total_frames)
    done = 0
    while done < total_frames:
        step = min(batch_frames, total_frames - done)
        reporter.advance(step)
        done += step
    reporter.finish()


def test_reporters_satisfy_the_protocol():
    assert isinstance(SilentReporter(), Reporter)
    assert isinstance(RichReporter(stderr_console()), Reporter)


def test_rich_reporter_writes_frames_to_its_console_only(capsys):
    console = stderr_console()
    with RichReporter(console) as reporter:
        run_render(reporter, total_frames=10, batch_frames=4)

    shown = console.file.getvalue()
    assert "source coefficients: first frame of coeffs.mat" in shown
    assert "10/10 frames" in shown  # frames, not the 3 batches
    assert "frames/s" in shown
    captured = capsys.readouterr()
    assert captured.out == ""


def test_rich_reporter_default_console_uses_stderr(capsys):
    reporter = RichReporter()
    assert reporter.console.stderr
    reporter.note("hello from sfr")
    reporter.start(3)
    reporter.advance(3)
    reporter.finish()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "hello from sfr" in captured.err


def test_rich_reporter_stops_live_display_on_exception():
    console = stderr_console()
    with pytest.raises(RuntimeError):
        with RichReporter(console) as reporter:
            reporter.start(8)
            reporter.advance(2)
            raise RuntimeError("render failed")
    # No live display is left registered on the console (rich >= 14 keeps a stack, older ones one slot).
    assert not getattr(console, "_live_stack", getattr(console, "_live", None))
    assert "2/8 frames" in console.file.getvalue()


def test_rich_reporter_loading_then_finish_without_frames():
    """Loading messages replace each other on one spinner line, which finish removes (twice is fine)."""
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=True)
    with RichReporter(console) as reporter:
        reporter.loading("loading checkpoints")
        reporter.loading("loading mapping")
        assert len(getattr(console, "_live_stack", [getattr(console, "_live", None)])) == 1, "one spinner"
    reporter.finish()
    shown = console.file.getvalue()
    assert "loading mapping" in shown and "frames" not in shown
    assert shown.endswith("\x1b[2K"), "the spinner line is erased, not left behind"
    assert "\x1b[?25h" in shown, "the cursor is shown again"
    assert not getattr(console, "_live_stack", getattr(console, "_live", None))


def test_silent_reporter_prints_nothing(capsys):
    with SilentReporter() as reporter:
        run_render(reporter)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
