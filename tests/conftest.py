import os

import pytest
import torch

# Tests are small: one intra-op thread keeps timings stable and avoids oversubscribing CI.
torch.set_num_threads(int(os.environ.get("MOEKIT_TEST_THREADS", "1")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture
def seed():
    torch.manual_seed(0)


# Hypothesis: a fixed example sequence in CI (no flaky runs); MOEKIT_EXPLORE=N explores
# N fresh random examples per property instead.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=100)
settings.register_profile("explore", max_examples=int(os.environ.get("MOEKIT_EXPLORE", "0") or 0) or 100)
settings.load_profile("explore" if os.environ.get("MOEKIT_EXPLORE") else "ci")
