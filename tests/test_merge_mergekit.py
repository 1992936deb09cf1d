"""Parity with mergekit 0.1.5 (LGPL-3.0: a peer only, never a dependency; `make test` does not
install it, so these tests are skipped there). To run them::

    bash benchmarks/peers/install_mergekit.sh
    PYTHONPATH=benchmarks/peers/.mergekit-pkgs .venv/bin/python -m pytest \
        tests/test_merge_mergekit.py

Same real tensors in, mergekit's ``merge_tensors`` against ``merge_deltas`` plus the base; its
random masks come from torch's default generator, seeded as ours is."""
import pytest
import torch

from slimtune.merge import merge_deltas

mergekit_methods = pytest.importorskip("mergekit.merge_methods")

WEIGHTS = [0.7, 1.3, 0.5]


@pytest.fixture(scope="module")
def tensors(smollm2):
    """The base (block 0's q_proj) and three real 'models' (blocks 1-3's q_proj)."""
    q = [smollm2[0].get_submodule(f"model.layers.{i}.self_attn.q_proj").weight.detach()
         for i in range(4)]
    return q[0], q[1:]


@pytest.mark.parametrize("method, ours, theirs", [
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {"lambda": 0.6}, {"lambda": 0.6}),
    ("ties", {"density": 0.3}, {"density": 0.3}),
    ("ties", {"density": 0.3, "normalize": False}, {"density": 0.3, "normalize": False}),
    ("dare", {"density": 0.4, "rescale": "l1", "seed": 5}, {"density": 0.4}),
    ("dare", {"density": 0.4, "rescale": "l1", "then": "ties", "seed": 5}, {"density": 0.4}),
    ("breadcrumbs", {"density": 0.3}, {"density": 0.3}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "lambda": 0.8},
     {"density": 0.5, "gamma": 0.1, "lambda": 0.8}),
])
def test_equals_mergekit(tensors, method, ours, theirs):
    base, models = tensors
    name = {"dare": "dare_ties" if ours.get("then") == "ties" else "dare_linear"}.get(method,
                                                                                      method)
    torch.manual_seed(ours.get("seed", 0))
    want = mergekit_methods.merge_tensors([base, *models], name, base_index=0,
                                          parameters={"weight": WEIGHTS, **theirs})
    got = base + merge_deltas(method, [m - base for m in models], WEIGHTS, **ours)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_linear_equals_mergekit(tensors):
    base, models = tensors
    want = mergekit_methods.merge_tensors(models, "linear", parameters={"weight": WEIGHTS})
    got = base + merge_deltas("linear", [m - base for m in models], WEIGHTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_equals_mergekit(tensors, t):
    base, models = tensors
    want = mergekit_methods.merge_tensors(models[:2], "slerp", base_index=0,
                                          parameters={"t": t})
    got = base + merge_deltas("slerp", [m - base for m in models[:2]], base=base, t=t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
