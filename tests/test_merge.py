"""Merging task vectors (slimtune.merge): parity with PEFT's merge_utils on the same tensors,
the methods' defining properties, and bad input."""
import pytest
import torch
from peft.utils import merge_utils as peft_merge

from slimtune.merge import MERGES, merge_deltas
from slimtune.weights.task_vectors import (elect_sign, keep_magnitude_band, keep_top_magnitude,
                                          rescale_kept)

WEIGHTS = [0.7, 1.3, 0.5]


@pytest.fixture(scope="module")
def real_deltas(smollm2):
    """Three real task-vector-like tensors: SmolLM2's q_proj of blocks 1-3 minus block 0's."""
    q = [smollm2[0].get_submodule(f"model.layers.{i}.self_attn.q_proj").weight.detach()
         for i in range(4)]
    return [w - q[0] for w in q[1:]]


def synthetic(shape=(64, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * s for s in (1.0, 0.5, 2.0)]


@pytest.mark.parametrize("method", MERGES.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_registered_method_merges_real_tensors(real_deltas, method, dtype):
    """The family's matrix: each method with its ``example`` keys, on real SmolLM2 tensors in
    float32 and bfloat16 -- the task vectors' shape and dtype, finite, and the same twice."""
    config = MERGES.get(method).config
    deltas = [d.to(dtype) for d in real_deltas[:config.n_models or 3]]
    base = torch.zeros_like(deltas[0])
    runs = [merge_deltas(method, deltas, [1.0, 0.5, 0.8][:len(deltas)], base=base,
                         **config.example) for _ in range(2)]
    assert runs[0].shape == deltas[0].shape and runs[0].dtype == dtype
    assert torch.isfinite(runs[0]).all() and runs[0].abs().sum() > 0
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], WEIGHTS])
def test_task_arithmetic_equals_peft(real_deltas, weights):
    got = merge_deltas("task_arithmetic", real_deltas, weights)
    want = peft_merge.task_arithmetic(real_deltas, torch.tensor(weights))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], WEIGHTS])
def test_ties_peft_convention_equals_peft(real_deltas, majority, weights):
    got = merge_deltas("ties", real_deltas, weights, density=0.3, majority=majority,
                       convention="peft", tie_break="peer")
    want = peft_merge.ties(real_deltas, torch.tensor(weights), 0.3, majority)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # the default tie_break (index) differs only where a task's tied entries were chosen
    index = merge_deltas("ties", real_deltas, weights, density=0.3, majority=majority,
                         convention="peft")
    differ = (index - want).abs() > 1e-7
    thresholds = [d.abs().reshape(-1).kthvalue(d.numel() - int(0.3 * d.numel()) + 1).values
                  for d in real_deltas]
    at_threshold = sum((d.abs() == t).int() for d, t in zip(real_deltas, thresholds)) > 0
    assert 0 < int(differ.sum()) < 1e-3 * differ.numel() and bool(at_threshold[differ].all())


def test_ties_conventions_agree_for_unit_weights_and_differ_otherwise(real_deltas):
    """On continuous values (no ties in magnitude, so both trims keep the same entries) unit
    weights give the same merge; the real weights' ties are trimmed in each peer's order."""
    unit = {c: merge_deltas("ties", synthetic(), density=0.3, convention=c)
            for c in ("mergekit", "peft")}
    torch.testing.assert_close(unit["mergekit"], unit["peft"], rtol=0, atol=1e-7)
    weighted = {c: merge_deltas("ties", real_deltas, WEIGHTS, density=0.3, convention=c)
                for c in ("mergekit", "peft")}
    assert (weighted["mergekit"] - weighted["peft"]).abs().max() > 1e-4


def test_ties_mergekit_convention_is_the_weighted_mean_of_agreeing_entries():
    deltas = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -4.0, 0.0])]
    got = merge_deltas("ties", deltas, [1.0, 2.0], density=1.0, **{"lambda": 0.5})
    # entry 0: both agree (+): (1·1 + 2·3) / 3; entry 1: weighted -2 + 2 = 0 → +1 wins: 2·1 / 2;
    # entry 2: 0.5 - 8 < 0 → only task 2: 2·(-4) / 2; entry 3: nothing agrees → 0
    want = 0.5 * torch.tensor([7 / 3, 1.0, -4.0, 0.0])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("then, peft_fn", [("linear", "dare_linear"), ("ties", "dare_ties")])
def test_dare_equals_peft_with_the_same_masks(real_deltas, then, peft_fn):
    got = merge_deltas("dare", real_deltas, WEIGHTS, density=0.4, then=then, convention="peft",
                       normalize=True, seed=11)
    torch.manual_seed(11)  # PEFT draws from the default generator, task by task
    want = getattr(peft_merge, peft_fn)(real_deltas, torch.tensor(WEIGHTS), 0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_dare_is_deterministic_per_seed_and_rescales():
    deltas = synthetic((256, 256))
    a, b = (merge_deltas("dare", deltas, density=0.2, seed=3) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, merge_deltas("dare", deltas, density=0.2, seed=4))
    exact = sum(deltas)  # inverse rescale keeps the expectation: close over 65536 entries
    assert abs(float(a.sum() - exact.sum())) < 0.05 * float(exact.abs().sum())
    t = deltas[0]
    kept = t * (torch.rand(t.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
    torch.testing.assert_close(rescale_kept(t, kept, 0.3, "l1").abs().sum(), t.abs().sum())


def test_linear_is_the_weighted_mean():
    deltas = synthetic()
    got = merge_deltas("linear", deltas, WEIGHTS)
    want = sum(w * d for w, d in zip(WEIGHTS, deltas)) / sum(WEIGHTS)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(merge_deltas("linear", deltas, WEIGHTS, normalize=False),
                               want * sum(WEIGHTS))


def test_breadcrumbs_drop_the_outliers_and_the_smallest():
    t = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)
    kept = keep_magnitude_band(t, density=0.3, gamma=0.1)
    assert sorted(kept[kept != 0].abs().tolist()) == [float(v) for v in range(61, 91)]
    kept = keep_magnitude_band(t, density=0.95, gamma=0.1)  # density wins over gamma
    assert sorted(kept[kept != 0].abs().tolist()) == [float(v) for v in range(1, 96)]
    deltas = synthetic()
    got = merge_deltas("breadcrumbs", deltas, WEIGHTS, density=0.3, gamma=0.05)
    want = sum(w * keep_magnitude_band(d, 0.3, 0.05) for w, d in zip(WEIGHTS, deltas))
    torch.testing.assert_close(got, want)


def test_trim_keeps_exactly_k_and_a_tied_vote_elects_plus():
    t = synthetic()[0]
    kept = keep_top_magnitude(t, 0.25)
    assert int((kept != 0).sum()) == int(0.25 * t.numel())
    assert kept.abs().min() == 0 and kept[kept != 0].abs().min() >= t.abs().median()
    assert elect_sign(torch.tensor([[1.0, -1.0], [-1.0, -2.0]])).tolist() == [1.0, -1.0]


@pytest.mark.parametrize("call, message", [
    (lambda d: merge_deltas("nope", d), "unknown merge method 'nope'"),
    (lambda d: merge_deltas("ties", d, density=0), "density"),
    (lambda d: merge_deltas("dare", d, density=1.5), "density"),
    (lambda d: merge_deltas("ties", d, density=0.5, lamda=2), "lamda: unknown parameter; "
     "known: density, lambda"),
    (lambda d: merge_deltas("linear", d, [1.0]), "1 weights for 3 task vectors"),
    (lambda d: merge_deltas("linear", [d[0], d[1][:2]]), "different shapes"),
    (lambda d: merge_deltas("linear", []), "no task vectors"),
    (lambda d: merge_deltas("linear", d, [1.0, -1.0, 0.0]), "sum to 0"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(synthetic())


def test_slerp_ends_at_the_models_and_keeps_the_norm_between_orthogonal_ones():
    base = torch.zeros(2, 2)
    a, b = torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    for t, want in ((0.0, a), (1.0, b)):
        torch.testing.assert_close(merge_deltas("slerp", [a, b], base=base, t=t), want)
    mid = merge_deltas("slerp", [a, b], base=base, t=0.5)
    torch.testing.assert_close(mid.norm(), torch.tensor(3.0))  # on the circle, not the chord
    torch.testing.assert_close(merge_deltas("slerp", [a, 2 * a], base=base, t=0.5), 1.5 * a)
    with pytest.raises(ValueError, match="needs the base tensor"):
        merge_deltas("slerp", [a, b], t=0.5)
    with pytest.raises(ValueError, match="merges exactly 2 models, got 3"):
        merge_deltas("slerp", [a, b, a], base=base, t=0.5)


def test_compeft_is_ternary_with_one_scale_per_task(real_deltas):
    from slimtune.merge.compeft import ternarise

    t = real_deltas[0]
    tern = ternarise(t, 0.1, 0.5)
    s = 0.5 * float(t.std())
    torch.testing.assert_close(torch.unique(tern), torch.tensor([-s, 0.0, s]))
    assert int((tern != 0).sum()) == int(0.1 * t.numel())
    assert ((tern != 0) <= (keep_top_magnitude(t, 0.1) != 0)).all()
    got = merge_deltas("compeft", real_deltas, WEIGHTS, density=0.1, scale=0.5)
    want = sum(w * ternarise(d, 0.1, 0.5) for w, d in zip(WEIGHTS, real_deltas))
    torch.testing.assert_close(got, want)
