"""Shared fixtures: the ggml oracle (fails loudly if absent) and named regression inputs."""

import pytest

from rioquant.testing.oracles import GgmlOracle


@pytest.fixture(scope="session")
def ggml() -> GgmlOracle:
    return GgmlOracle()
