"""Progress bars are drawn on a terminal only (logs and CI stay quiet), and never against --no-progress."""

import io

import pytest

from rioquant.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal,enabled,drawn", [(True, True, True), (True, False, False), (False, True, False)])
def test_progress_bar_is_drawn_only_on_a_terminal_when_asked(monkeypatch, terminal, enabled, drawn):
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with progress_bar(enabled, total=10, desc="x") as bar:
        bar.update(10)
    assert bool(stream.getvalue()) == drawn
