"""PCB-Merging, TALL-masks / Consensus Merging and TSV-Merge (slimtune.merge.pcb, .tall_masks,
.tsv): equal to transcriptions of the authors' reference code, the papers' defining properties
on real SmolLM2 weights, exact small cases, and bad keys."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune.merge import merge_deltas
from slimtune.merge.models import merge_models
from slimtune.weights.task_masks import (consensus_mask, pcb_balancing, pcb_drop_scale,
                                         tall_masks)
from slimtune.weights.task_subspaces import tsv_factors

WEIGHTS = [1.0, 0.5, 0.8]


def real(smollm2, module: str, blocks=range(4)) -> list[torch.Tensor]:
    """Task-vector-like real tensors: ``module``'s weight in blocks 1-3 minus block 0's."""
    w = [smollm2[0].get_submodule(f"model.layers.{i}.{module}").weight.detach() for i in blocks]
    return [t - w[0] for t in w[1:]]


@pytest.fixture(scope="module")
def real_deltas(smollm2):
    return real(smollm2, "self_attn.q_proj")  # 3 x [576, 576]


@pytest.fixture(scope="module")
def real_rectangular(smollm2):
    return real(smollm2, "mlp.gate_proj")  # 3 x [1536, 576]


@pytest.fixture(scope="module")
def real_norms(smollm2):
    return real(smollm2, "input_layernorm")  # 3 x [576]


def synthetic(shape=(64, 48), seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * s for s in (1.0, 0.5, 2.0, 1.5)[:n]]


# --- transcriptions of the reference code (read, not imported), for parity --------------------

def reference_pcb(deltas, weights, ratio):
    """duguodong7/pcb-merging ``pcb-merging.py`` ``PCB_merge`` (normalize, clamp, act as there)
    with the per-task coefficients of ``vision_source_code/pcb_ES.py`` ``compute_acc``."""
    def normalize(x, dim=0):
        lo, hi = torch.min(x, dim=dim, keepdim=True)[0], torch.max(x, dim=dim, keepdim=True)[0]
        return (x - lo) / (hi - lo)

    def clamp(x, min_ratio=0, max_ratio=0):
        d = x.size(1)
        s, _ = torch.sort(x, dim=1)
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1),
                           s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    shape = deltas[0].shape
    all_checks = torch.stack([t.reshape(-1) for t in deltas])
    n, _ = all_checks.shape
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.0001, max_ratio=0.0001)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    self_pcb_act = torch.exp(n * normalize(all_checks_abs, 1) ** 2)
    cross_pcb_act = torch.tanh(all_checks * torch.sum(all_checks, dim=0))
    scale = normalize(clamp(self_pcb_act * cross_pcb_act, 1 - ratio, 0), dim=1)
    tvs = clamped_all_checks * torch.tensor(weights, dtype=all_checks.dtype).unsqueeze(1)
    merged = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged.reshape(shape)


def reference_consensus(deltas, lam, prun_thre_k):
    """nik-dim/tall_masks ``generate_task_masks`` (tv = Σ τ, flat_ptm = 0) and
    ``construct_consensus_mask``, then ``merged_tv * consensus_mask`` (``aggregation.py``)."""
    tv_flat_checks = torch.stack([t.reshape(-1) for t in deltas])
    flat_ptm = torch.zeros_like(tv_flat_checks[0])
    flat_ft = flat_ptm + tv_flat_checks
    tv = tv_flat_checks.sum(0)
    mask = (flat_ptm - flat_ft).abs() > ((flat_ptm + tv) - flat_ft).abs() * lam
    consensus = mask.float().sum(0) >= prun_thre_k
    return (tv * consensus).reshape(deltas[0].shape)


def reference_tsv(deltas):
    """AntoAndGar/task_singular_vectors ``TSVM_utils.compute_and_sum_svd_mem_reduction`` for
    one key (zero-padded U, S, V; ``sv_reduction = 1 / T``)."""
    sv_reduction = 1 / len(deltas)
    for i, vec in enumerate(deltas):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        r = int(s.shape[0] * sv_reduction)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_v[i * r:(i + 1) * r, :] = v[:r, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


# --- PCB ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_pcb_equals_the_reference_code(real_deltas, real_norms, ratio):
    for deltas in (synthetic((5, 7), n=2), synthetic(), real_deltas, real_norms):
        for weights in ([1.0] * len(deltas), WEIGHTS[:len(deltas)]):
            got = merge_deltas("pcb", deltas, weights, ratio=ratio)
            torch.testing.assert_close(got, reference_pcb(deltas, weights, ratio))


def test_pcb_in_float64_equals_the_reference_in_float64(real_deltas):
    deltas = [d.double() for d in real_deltas]
    got = merge_deltas("pcb", deltas, WEIGHTS, ratio=0.2, **{"lambda": 0.7})
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, 0.7 * reference_pcb(deltas, WEIGHTS, 0.2))


def test_pcb_keeps_the_ratio_of_each_tasks_entries():
    """Continuous scores: exactly the entries above each row's int(d(1 − ratio))-th smallest keep
    a weight, in (0, 1], the top one 1."""
    beta = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    for ratio in (0.05, 0.3, 1.0):
        scale = pcb_drop_scale(beta, ratio)
        threshold = beta.sort(dim=1).values[:, int(1000 * (1 - ratio))].unsqueeze(1)
        assert torch.equal(scale > 0, beta > threshold)
        assert ((scale > 0).sum(dim=1) == 1000 - int(1000 * (1 - ratio)) - 1).all()
        assert torch.equal(scale.amax(dim=1), torch.ones(3))


def test_pcb_of_one_model_is_the_model_but_for_the_references_two_edits():
    """One task, ratio 1: every entry keeps a positive weight and comes back unchanged, except the
    lowest-scored (smallest |τ|) entry, dropped, and the largest, clamped to the next one's
    magnitude (99.99% quantile of a tensor under 10 000 entries)."""
    t = torch.tensor([0.3, -2.0, 0.05, 1.0, -0.7, 4.0])
    got = merge_deltas("pcb", [t], ratio=1.0)
    torch.testing.assert_close(got, torch.tensor([0.3, -2.0, 0.0, 1.0, -0.7, 2.0]))


def test_pcb_zero_task_vectors_are_ignored_and_never_nan(real_deltas):
    """A model that left a tensor unchanged gets weight 0 there (the reference divides 0 by 0):
    it neither dilutes the others nor turns the merge into NaN."""
    zero = torch.zeros_like(real_deltas[0])
    assert torch.equal(merge_deltas("pcb", [zero, zero], ratio=0.5), zero)
    got = merge_deltas("pcb", [real_deltas[0], zero], ratio=0.5)
    clamped = pcb_balancing(torch.stack([real_deltas[0], zero]).reshape(2, -1))[0][0]
    kept = got != 0
    assert torch.isfinite(got).all() and 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(got[kept], clamped.reshape(zero.shape)[kept])


def test_pcb_weights_scale_the_numerator_and_lambda_the_result():
    deltas = synthetic()
    unit = merge_deltas("pcb", deltas, ratio=0.3)
    torch.testing.assert_close(merge_deltas("pcb", deltas, [2.0] * 3, ratio=0.3), 2 * unit)
    torch.testing.assert_close(merge_deltas("pcb", deltas, ratio=0.3, **{"lambda": 0.5}),
                               0.5 * unit)


# --- TALL masks / Consensus --------------------------------------------------------------------

HAND = [torch.tensor([1.0, 0.1, 0.0, -2.0]), torch.tensor([1.0, 2.0, 0.0, 2.0]),
        torch.tensor([0.0, 0.0, 0.0, 0.5])]  # τ_MTL = [2, 2.1, 0, 0.5]


def test_tall_masks_by_hand():
    # m₁ = |τ₁| > 0.4|τ_MTL − τ₁|: 1 > 0.4, 0.1 > 0.8 no, 0 > 0 no, 2 > 1.0
    # m₂: 1 > 0.4, 2 > 0.04, 0 > 0 no, 2 > 0.6;  m₃: 0 > 0.8 no, 0 > 0.84 no, 0 > 0 no, 0.5 > 0
    stacked = torch.stack(HAND)
    masks = tall_masks(stacked, stacked.sum(dim=0), torch.full((3,), 0.4))
    assert masks.int().tolist() == [[1, 0, 0, 1], [1, 1, 0, 1], [0, 0, 0, 1]]
    want = {1: [2.0, 2.1, 0.0, 0.5], 2: [2.0, 0.0, 0.0, 0.5], 3: [0.0, 0.0, 0.0, 0.5],
            4: [0.0, 0.0, 0.0, 0.0]}
    for k, values in want.items():
        assert consensus_mask(masks, k).tolist() == [v != 0 for v in values]
        torch.testing.assert_close(merge_deltas("tall_masks", HAND, consensus=k),
                                   torch.tensor(values))


def test_tall_masks_per_model_lambdas_weights_and_the_strict_comparison():
    # λ₂ = 5: m₂ = [1 > 5 no, 2 > 0.5, no, 2 > 7.5 no] → counts [1, 1, 0, 2]
    got = merge_deltas("tall_masks", HAND, lambdas=[0.4, 5.0, 0.4], consensus=2)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, 0.5]))
    # weights enter τ_MTL = 1 + 0.25·2 = 1.5 only; the masks compare the unweighted τᵢ:
    # m₁ = 1 > 0.5·|1.5 − 1|, m₂ = 2 > 0.5·|1.5 − 2| (with w₂τ₂ = 0.5 it would be 0.5 > 0.5: no)
    a, b = torch.tensor([1.0]), torch.tensor([2.0])
    assert merge_deltas("tall_masks", [a, b], [1.0, 0.25], lambdas=0.5, consensus=2) == 1.5
    assert merge_deltas("tall_masks", [a, b], [1.0, 2.0], lambdas=0.5, consensus=2) == 0.0
    # equality is not enough (the reference's ``>``): 1 > 0.5·|3 − 1| is false
    assert tall_masks(torch.stack([a, b]), a + b, torch.tensor([0.5, 0.5]))[0].item() is False


def test_tall_masks_equal_the_reference_code(real_deltas, real_norms):
    for deltas in (real_deltas, real_norms, synthetic()):
        for lam, k in ((0.4, 2), (0.2, 1), (0.6, 3)):
            got = merge_deltas("tall_masks", deltas, lambdas=lam, consensus=k)
            torch.testing.assert_close(got, reference_consensus(deltas, lam, k))


def test_consensus_1_with_lambdas_0_is_task_arithmetic(real_deltas):
    got = merge_deltas("tall_masks", real_deltas, WEIGHTS, lambdas=0, consensus=1,
                       **{"lambda": 0.7})
    want = merge_deltas("task_arithmetic", real_deltas, WEIGHTS, **{"lambda": 0.7})
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_consensus_above_the_number_of_models_keeps_nothing(real_deltas):
    assert not merge_deltas("tall_masks", real_deltas, consensus=4).any()
    assert merge_deltas("tall_masks", real_deltas, consensus=3).any()


def test_a_tall_mask_with_lambda_1_is_the_best_entrywise_reconstruction(real_deltas):
    """With λ = 1, mᵢ ⊙ τ_MTL is at every entry the nearer of 0 and τ_MTL to τᵢ: its error is
    min(|τᵢ|, |τ_MTL − τᵢ|), so it beats both the base and the multi-task model (the paper's
    compression claim, on real weights)."""
    stacked = torch.stack(real_deltas)
    multi = stacked.sum(dim=0)
    masks = tall_masks(stacked, multi, torch.ones(3))
    for t, m in zip(stacked, masks):
        error = (m * multi - t).abs()
        torch.testing.assert_close(error, torch.minimum(t.abs(), (multi - t).abs()))
        assert error.norm() < min(t.norm(), (multi - t).norm())


# --- TSV ---------------------------------------------------------------------------------------

def test_tsv_equals_the_reference_code(real_deltas, real_rectangular):
    for deltas in (real_deltas, real_rectangular, synthetic((64, 50))):  # 50: 2 zero-padded
        want = reference_tsv(deltas)
        got = merge_deltas("tsv", deltas)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_tsv_of_non_matrices_is_the_weighted_mean(real_norms):
    torch.testing.assert_close(merge_deltas("tsv", real_norms), sum(real_norms) / 3)
    want = sum(w * d for w, d in zip(WEIGHTS, real_norms)) / sum(WEIGHTS)
    torch.testing.assert_close(merge_deltas("tsv", real_norms, WEIGHTS, alpha=2.0), 2 * want)


def test_tsv_is_the_polar_factors_around_the_concatenated_singular_values(real_deltas):
    stacked = torch.stack([w * d for w, d in zip(WEIGHTS, real_deltas)])
    U, S, Vh = tsv_factors(stacked, 0.2)  # k = 115 per task, 345 <= 576
    assert U.shape == (576, 345) and S.shape == (345,) and Vh.shape == (345, 576)
    eye = torch.eye(345)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-4)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=1e-4)
    tops = [torch.linalg.svdvals(d)[:115] for d in stacked]
    torch.testing.assert_close(S, torch.cat(tops), rtol=1e-5, atol=0)
    got = merge_deltas("tsv", real_deltas, WEIGHTS, fraction=0.2, alpha=0.5)
    torch.testing.assert_close(got, 0.5 * (U * S) @ Vh)


def test_tsv_of_one_task_with_fraction_1_is_that_task(real_deltas):
    delta = real_deltas[0]
    scale = float(delta.abs().max())  # float32 SVD round trip: 1e-5 of the largest entry
    got = merge_deltas("tsv", [delta], fraction=1.0)
    torch.testing.assert_close(got, delta, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(merge_deltas("tsv", [delta], [2.0]), 2 * delta, rtol=0,
                               atol=2e-5 * scale)
    got = merge_deltas("tsv", [delta.double()], fraction=1.0)
    torch.testing.assert_close(got, delta.double(), rtol=0, atol=1e-12)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_weighted_sum():
    g = torch.Generator().manual_seed(0)
    P = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    a = P[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ Q[:, :2].T
    b = P[:, 2:4] @ torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64)) @ Q[:, 2:4].T
    got = merge_deltas("tsv", [a, b], [1.0, 0.5], fraction=0.25)  # k = 2: each task's rank
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, a + 0.5 * b, rtol=0, atol=1e-12)
    assert (got - (a + b)).abs().max() > 0.1  # the weight counts


def test_tsv_rank_is_at_most_the_kept_triplets(real_deltas):
    got = merge_deltas("tsv", real_deltas, fraction=0.1)  # 57 per task
    assert torch.linalg.matrix_rank(got) <= 3 * 57
    assert torch.linalg.matrix_rank(sum(real_deltas)) > 3 * 57  # what task arithmetic keeps


def test_tsv_on_a_matrix_smaller_than_the_number_of_tasks_keeps_one_triplet_each():
    deltas = synthetic((2, 5))  # min(m, n) / 3 < 1
    got = merge_deltas("tsv", deltas)
    assert got.shape == (2, 5) and torch.isfinite(got).all() and got.abs().sum() > 0


# --- shared: dtypes, bad keys, merge_models ----------------------------------------------------

@pytest.mark.parametrize("method, params", [("pcb", {"ratio": 0.3}), ("tall_masks", {}),
                                            ("tsv", {})])
def test_dtype_is_kept_and_bfloat16_is_computed_in_float32(real_deltas, method, params):
    deltas = [d[:64, :96] for d in real_deltas]
    want = merge_deltas(method, [d.bfloat16().float() for d in deltas], **params)
    for dtype in (torch.bfloat16, torch.float64):
        got = merge_deltas(method, [d.to(dtype) for d in deltas], **params)
        assert got.dtype == dtype
    got = merge_deltas(method, [d.bfloat16() for d in deltas], **params)
    assert torch.equal(got, want.bfloat16())  # the same float32 arithmetic, rounded once


@pytest.mark.parametrize("method, params, message", [
    ("pcb", {"ratio": 0}, r"merge \(pcb\): ratio: input should be greater than 0"),
    ("pcb", {"ratio": 1.5}, r"merge \(pcb\): ratio: input should be less than or equal to 1"),
    ("tall_masks", {"consensus": 0}, r"merge \(tall_masks\): consensus: input should be greater"),
    ("tall_masks", {"lambdas": [0.4, 0.4]}, r"tall_masks: lambdas: 2 values for 3 models"),
    ("tall_masks", {"lambdas": -0.1}, r"merge \(tall_masks\): lambdas: must be a number >= 0"),
    ("tall_masks", {"lambdas": []}, r"lambdas: must be a number >= 0 or a non-empty list"),
    ("tall_masks", {"lambdas": "big"}, r"lambdas: must be a number >= 0"),
    ("tsv", {"fraction": 0}, r"merge \(tsv\): fraction: input should be greater than 0"),
    ("tsv", {"fraction": 1.5}, r"merge \(tsv\): fraction"),
    ("tsv", {"rank": 4}, r"rank: unknown parameter; known: fraction, alpha"),
])
def test_bad_keys_are_one_clear_error(method, params, message):
    with pytest.raises(ValueError, match=message):
        merge_deltas(method, synthetic(), **params)


def test_tsv_refuses_weights_summing_to_zero_on_a_vector():
    with pytest.raises(ValueError, match="tsv: the weights sum to 0"):
        merge_deltas("tsv", synthetic((6,), n=2), [1.0, -1.0])


def toy_model(directory, tensors):
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 6}))
    return directory


@pytest.fixture
def toy_models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    tuned = [{n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
             for _ in range(3)]
    dirs = [toy_model(tmp_path / f"m{i}", t) for i, t in enumerate(tuned)]
    return toy_model(tmp_path / "base", base), dirs, base, tuned


@pytest.mark.parametrize("method, params", [("pcb", {"ratio": 0.5}),
                                            ("tall_masks", {"lambdas": [0.2, 0.4, 0.6]}),
                                            ("tsv", {"fraction": 0.2})])
def test_merge_models_equals_merge_deltas(toy_models, tmp_path, method, params):
    base_dir, dirs, base, tuned = toy_models
    config = {"method": method, "base": str(base_dir), **params,
              "models": [{"path": str(d), "weight": w} for d, w in zip(dirs, WEIGHTS)]}
    merged = load_file(str(merge_models(config, tmp_path / "out", progress=False)
                           / "model.safetensors"))
    for name, t in base.items():
        want = t + merge_deltas(method, [m[name] - t for m in tuned], WEIGHTS, **params)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)


def test_merge_models_names_lambdas_of_the_wrong_length(toy_models, tmp_path):
    base_dir, dirs, _, _ = toy_models
    config = {"method": "tall_masks", "base": str(base_dir), "lambdas": [0.4, 0.4],
              "models": [{"path": str(d)} for d in dirs]}
    with pytest.raises(ValueError, match=r"tall_masks: lambdas: 2 values for 3 models"):
        merge_models(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_kept_rank_is_floor_of_the_fraction_and_at_least_one():
    from slimtune.weights.task_subspaces import kept_rank
    assert kept_rank((576, 576), 1 / 3) == 192 == int(576 * (1 / 3))
    assert kept_rank((1536, 576), 0.1) == math.floor(57.6)
    assert kept_rank((2, 5), 1 / 3) == 1
