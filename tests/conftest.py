"""Shared fixtures: the real models, loaded once per test session.

Tests marked ``slow`` run only with ``SLIMTUNE_SLOW=1`` (``make test-all``); CI runs the rest.
"""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SLIMTUNE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow real-model test: run with SLIMTUNE_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M in float32 eval mode. Do not modify it in place:
    deep-copy the model (``copy.deepcopy``) before wrapping or training it."""
    from slimtune.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from slimtune.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="session")
def ptb_test_ids(smollm2):
    """Token ids of the PTB test split under SmolLM2's tokenizer (1-D LongTensor)."""
    from slimtune.data import load_text

    _, tok = smollm2
    return torch.tensor(tok(load_text("ptb", "test"))["input_ids"], dtype=torch.long)
