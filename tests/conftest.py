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


@pytest.fixture(scope="session")
def minilm_experts(tmp_path_factory):
    """MiniLM and two 'experts': its float tensors plus seeded random task vectors."""
    import shutil

    from safetensors.torch import load_file, save_file

    from slimtune.models import resolve_model_dir
    base = resolve_model_dir("minilm-l6")
    root = tmp_path_factory.mktemp("experts")
    state = load_file(str(base / "model.safetensors"))
    dirs = []
    for k in range(2):  # expert 1 lacks the non-float buffers (as a re-saved model does)
        g = torch.Generator().manual_seed(k)
        tuned = {n: (t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point()
                     else t) for n, t in state.items() if k == 0 or t.is_floating_point()}
        d = root / f"expert{k}"
        d.mkdir()
        save_file(tuned, str(d / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(base / "config.json", d / "config.json")
        dirs.append(d)
    return base, dirs, state
