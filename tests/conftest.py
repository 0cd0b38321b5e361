"""Shared fixtures: the ggml oracle (fails loudly if absent), the tiny vision checkpoint, module-lived folders."""

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from rioquant.testing.oracles import GgmlOracle


@pytest.fixture(scope="session")
def ggml() -> GgmlOracle:
    return GgmlOracle()


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory) -> Path:
    """Qwen3_5MoeForConditionalGeneration with a tiny vision tower (and MTP): the mmproj tests' one checkpoint."""
    from rioquant.testing.checkpoints import TINY, build_checkpoint

    return build_checkpoint(replace(TINY, with_vision=True, mtp=True), tmp_path_factory.mktemp("vision") / "Tiny-VL")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """`module_tmp(name)`: a fresh folder that lives as long as the test module, removed after its last test.

    Why: the suite writes about 27 GB of checkpoints and GGUFs; pytest's `failed` retention (pyproject) drops a
    passed test's own `tmp_path` at once, but folders made by `tmp_path_factory` would stay until the session
    ends, and a clean CI machine does not have that much disk to spare."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
