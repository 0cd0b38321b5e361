"""Shared fixtures: the ggml oracle (fails loudly if absent), the tiny vision checkpoint, named regression inputs."""

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
