"""Faults injected through the pipeline's seams (rioquant.convert.ConvertHooks, OutputFS)."""

from collections.abc import Callable
from typing import Any


def fails_on_call(n: int, error: BaseException, call: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """A stand-in that raises `error` on its n-th call and otherwise returns `call(*args)` (None without
    `call`): a crash, a full disk or ^C at a chosen point of a run."""
    calls = 0

    def stand_in(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            raise error
        return call(*args) if call else None

    return stand_in
