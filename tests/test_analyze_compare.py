"""Weight analysis of fine-tunes: intruder dimensions, principal angles, the Matrix Nuclear-Norm,
ΔW spectra; on small tensors, on real SmolLM2 layers, and `slimtune compare` on real MiniLM
fine-tunes (a full-rank small perturbation and a LoRA adapter)."""
import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from slimtune.analyze.alignment import BASE_LABEL, alignment_matrix, layer_alignment
from slimtune.analyze.compare import one_thread
from slimtune.analyze.delta_spectra import delta_spectrum
from slimtune.analyze.intruders import count_below, intruder_dimensions
from slimtune.weights.nuclear_norm import l12_norm, matrix_nuclear_norm, nuclear_norm
from slimtune.weights.subspaces import (principal_angles, principal_cosines, subspace_similarity,
                                        top_singular_subspace)


def orthonormal(d, k, g):
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def weight(m, n, g, decay=0.9):
    """A float64 [m, n] weight with a decaying, well-separated spectrum."""
    r = min(m, n)
    S = torch.tensor([decay ** i for i in range(r)], dtype=torch.float64) * 10
    return orthonormal(m, r, g) @ torch.diag(S) @ orthonormal(n, r, g).mT


# ---- intruder dimensions ----------------------------------------------------------------------

def test_an_injected_orthogonal_direction_is_exactly_one_intruder():
    g = torch.Generator().manual_seed(0)
    v = orthonormal(32, 1, g)[:, 0]
    W0 = weight(96, 32, g)
    W0 -= torch.outer(W0 @ v, v)  # v is in W0's null space, so (30, u, v) is an exact triplet
    basis = torch.linalg.svd(W0, full_matrices=False).U  # tall: spans only 32 of R^96
    u = torch.randn(96, generator=g, dtype=torch.float64)
    u -= basis @ (basis.mT @ u)  # orthogonal to every base singular vector
    u /= u.norm()
    result = intruder_dimensions(W0 + 30 * torch.outer(u, v), W0)  # 3 x the top singular value
    assert result["count"] == 1 and result["indices"] == [0]
    assert result["best_match"][0] < 1e-6 and min(result["best_match"][1:]) > 0.9


def test_identical_or_slightly_perturbed_weights_have_no_intruders():
    g = torch.Generator().manual_seed(1)
    W0 = weight(64, 48, g)
    same = intruder_dimensions(W0.clone(), W0)
    assert same["count"] == 0 and min(same["best_match"]) > 1 - 1e-9
    noisy = W0 + 1e-3 * torch.randn(W0.shape, generator=g, dtype=torch.float64)
    assert intruder_dimensions(noisy, W0)["count"] == 0


def test_threshold_and_k_are_the_papers_parameters():
    assert count_below([0.1, 0.49, 0.5, 0.9], 0.5) == 2
    assert count_below([0.1, 0.49, 0.5, 0.9], 0.95) == 4
    g = torch.Generator().manual_seed(2)
    W0 = weight(8, 8, g)
    assert len(intruder_dimensions(W0, W0, k=20)["best_match"]) == 8  # k capped at min(out, in)
    with pytest.raises(ValueError, match="epsilon"):
        intruder_dimensions(W0, W0, epsilon=0)


# ---- principal angles -------------------------------------------------------------------------

def test_principal_angles_of_a_known_rotation():
    theta = 0.3
    E = torch.eye(6, dtype=torch.float64)
    Q1, Q2 = E[:, :3], E[:, :3].clone()
    Q2[:, 2] = math.cos(theta) * E[:, 2] + math.sin(theta) * E[:, 3]
    rotation = orthonormal(6, 6, torch.Generator().manual_seed(3))  # a common rotation keeps them
    angles = principal_angles(rotation @ Q1, rotation @ Q2)
    torch.testing.assert_close(angles, torch.tensor([0.0, 0.0, theta], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert subspace_similarity(Q1, Q2) == pytest.approx((2 + math.cos(theta) ** 2) / 3)
    assert subspace_similarity(E[:, :3], E[:, 3:]) == pytest.approx(0.0)
    torch.testing.assert_close(principal_cosines(E[:, :3], E[:, 3:]),
                               torch.zeros(3, dtype=torch.float64))


def test_subspace_similarity_of_random_subspaces_is_k_over_d():
    g = torch.Generator().manual_seed(4)
    sims = [subspace_similarity(orthonormal(60, 6, g), orthonormal(60, 6, g)) for _ in range(100)]
    assert sum(sims) / len(sims) == pytest.approx(6 / 60, abs=0.01)


def test_top_singular_subspace_and_layer_alignment():
    g = torch.Generator().manual_seed(5)
    W = weight(40, 30, g)
    U, V = top_singular_subspace(W, 4), top_singular_subspace(W, 4, side="right")
    assert U.shape == (40, 4) and V.shape == (30, 4)
    same = layer_alignment((U, V), (U, V), angles=True)
    assert same["left"] == pytest.approx(1.0) and same["right"] == pytest.approx(1.0)
    assert max(same["left_angles"]) < 0.01
    assert subspace_similarity(U, top_singular_subspace(W.mT, 4, side="right")) == pytest.approx(1)


def test_alignment_matrix_is_symmetric_with_unit_diagonal_and_skips_unchanged_layers():
    g = torch.Generator().manual_seed(6)
    pair = lambda: (orthonormal(20, 3, g), orthonormal(10, 3, g))  # noqa: E731
    base = {"a": pair(), "b": pair()}
    shared = pair()
    updates = {"m1": {"a": shared, "b": pair()}, "m2": {"a": shared, "b": None},
               "m3": {"a": None, "b": None}}
    table = alignment_matrix(base, updates)
    assert table["labels"] == [BASE_LABEL, "m1", "m2", "m3"]
    for side in ("left", "right"):
        t = table[side]
        assert all(t[i][j] == t[j][i] for i in range(4) for j in range(4))
        assert [t[i][i] for i in range(3)] == pytest.approx([1.0] * 3)
        assert t[1][2] == pytest.approx(1.0)  # m1 and m2 share layer a's update
        assert t[3] == [None] * 4  # m3 changed nothing
    assert table["layers"][1][2] == 1 and table["layers"][0][1] == 2


# ---- Matrix Nuclear-Norm ----------------------------------------------------------------------

def test_l12_approximation_is_the_papers_definition():
    g = torch.Generator().manual_seed(7)
    P = torch.softmax(3 * torch.randn(5, 12, generator=g, dtype=torch.float64), dim=-1)
    norms = sorted((math.sqrt(sum(float(P[i, j]) ** 2 for i in range(5))) for j in range(12)),
                   reverse=True)
    assert l12_norm(P) == pytest.approx(sum(norms[:5]))  # D = min(rows, columns) = 5
    assert l12_norm(P, top_d=3) == pytest.approx(sum(norms[:3]))
    assert matrix_nuclear_norm(P) == pytest.approx(sum(norms[:5]) / 5)
    assert 0 < matrix_nuclear_norm(P) <= 1
    assert nuclear_norm(P) <= l12_norm(P, top_d=12) + 1e-12  # over all columns: an upper bound
    with pytest.raises(ValueError, match="top_d"):
        l12_norm(P, top_d=0)


def test_l12_approximation_is_exact_for_confident_predictions():
    labels = torch.tensor([0, 3, 3, 7, 1, 3])
    P = torch.nn.functional.one_hot(labels, 10).to(torch.float64)
    assert l12_norm(P) == pytest.approx(nuclear_norm(P))  # orthogonal columns
    assert matrix_nuclear_norm(torch.eye(4, 9)) == pytest.approx(1.0)  # confident and diverse
    uniform = torch.full((6, 10), 0.1)  # rank one: least diverse
    assert nuclear_norm(uniform) == pytest.approx(math.sqrt(6 / 10))
    assert matrix_nuclear_norm(uniform) < matrix_nuclear_norm(torch.eye(6, 10))


# ---- ΔW spectra -------------------------------------------------------------------------------

def test_effective_rank_of_a_rank_r_update_is_about_r():
    g = torch.Generator().manual_seed(8)
    W0 = weight(50, 40, g)
    flat = delta_spectrum(W0 + orthonormal(50, 8, g) @ orthonormal(40, 8, g).mT, W0)
    assert flat["effective_rank"] == pytest.approx(8, abs=1e-6)
    assert flat["stable_rank"] == pytest.approx(8) and flat["energy_r8"] == pytest.approx(1.0)
    lora = delta_spectrum(W0 + torch.randn(50, 8, generator=g, dtype=torch.float64)
                          @ torch.randn(8, 40, generator=g, dtype=torch.float64), W0)
    assert 4 < lora["effective_rank"] <= 8 + 1e-6 and lora["energy_r8"] == pytest.approx(1.0)
    assert int((lora["singular_values"] > 1e-9).sum()) == 8
    still = delta_spectrum(W0, W0)
    assert still["effective_rank"] == 0.0 and still["delta_norm"] == 0.0


# ---- real SmolLM2 layers ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.layers.5.self_attn.q_proj",
                                  "model.layers.20.mlp.down_proj"])
def test_lora_like_update_of_a_real_layer_has_intruders_small_full_rank_one_has_none(smollm2, name):
    model, _ = smollm2
    W0 = model.get_submodule(name).weight.detach()
    g = torch.Generator().manual_seed(9)
    B, A = torch.randn(W0.shape[0], 16, generator=g), torch.randn(16, W0.shape[1], generator=g)
    noise = torch.randn(W0.shape, generator=g)
    small = noise * (0.01 * float(W0.norm()) / float(noise.norm()))
    with one_thread():  # as compare runs them: much faster beside another busy process
        top = float(torch.linalg.matrix_norm(W0, ord=2))
        lora = B @ A * (top / float(torch.linalg.matrix_norm(B @ A, ord=2)))  # W0's top strength
        with_lora = intruder_dimensions(W0 + lora, W0)
        assert with_lora["count"] >= 3, with_lora
        assert intruder_dimensions(W0 + small, W0)["count"] == 0
        assert delta_spectrum(W0 + lora, W0)["effective_rank"] <= 16 + 1e-4
        assert delta_spectrum(W0 + small, W0)["effective_rank"] > 0.5 * min(W0.shape)


def test_nuclear_norm_is_computed_on_the_perplexity_windows(smollm2, ptb_test_ids):
    from slimtune.analyze.nuclear_norm import nuclear_norm_and_perplexity
    from slimtune.evaluate import perplexity

    model, _ = smollm2
    ids = ptb_test_ids[:100]
    with one_thread():
        result = nuclear_norm_and_perplexity(model, ids, seqlen=32, max_tokens=70, batch_size=2,
                                             progress=False)
        reference = perplexity(model, ids, seqlen=32, max_tokens=70, progress=False)
        with torch.no_grad():
            logits = model(input_ids=ids[None, :32], use_cache=False).logits[0, :-1]
    assert result["windows"] == 2
    assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    first = matrix_nuclear_norm(torch.softmax(logits, dim=-1))
    assert result["nuclear_norm_min"] <= first + 1e-6 and first - 1e-6 <= result["nuclear_norm_max"]
    assert 0 < result["nuclear_norm"] < 1


# ---- slimtune compare on real MiniLM fine-tunes ----------------------------------------------

@pytest.fixture(scope="module")
def finetunes(tmp_path_factory, minilm):
    """MiniLM's directory, a 'full fine-tune' (every float tensor + small noise) and a LoRA
    adapter (r=4, random factors: a strong low-rank update)."""
    from slimtune import adapt
    from slimtune.models import resolve_model_dir

    base = resolve_model_dir("minilm-l6")
    root = tmp_path_factory.mktemp("finetunes")
    full = root / "full"
    shutil.copytree(base, full, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))
    g = torch.Generator().manual_seed(10)
    state = {n: (t + 1e-3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
             for n, t in load_file(str(base / "model.safetensors")).items()}
    save_file(state, str(full / "model.safetensors"), metadata={"format": "pt"})
    model = adapt.apply(copy.deepcopy(minilm[0]), "lora", r=4, alpha=8, progress=False)
    for p in adapt.trainable_parameters(model).values():
        p.data = torch.randn(p.shape, generator=g)
    lora = adapt.save(model, root / "lora")
    other = root / "other-base"
    shutil.copytree(lora, other)
    manifest = json.loads((other / "adapter.json").read_text())
    manifest["base_model"] = "smollm2-135m"
    (other / "adapter.json").write_text(json.dumps(manifest))
    return root, full, lora, other


def test_cli_compare_writes_report_plots_and_table(finetunes, tmp_path):
    from slimtune.cli import app

    _, full, lora, _ = finetunes
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--base", "minilm-l6", "--models", str(full),
                                      str(lora), "--out", str(out), "--align-k", "4"])
    assert result.exit_code == 0, result.output
    assert "intruders" in result.stdout and "lora" in result.stdout
    for name in ("intruders.png", "delta_spectra.png", "alignment.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "compare.json").read_text())
    summary = report["summary"]
    assert summary["lora"]["intruders"] > 0 and summary["full"]["intruders"] == 0
    assert summary["full"]["changed_layers"] == summary["full"]["layers"] == 37
    assert summary["lora"]["delta_effective_rank_median"] <= 4 + 1e-6
    assert summary["full"]["delta_effective_rank_median"] > 100
    assert report["alignment"]["labels"] == [BASE_LABEL, "full", "lora"]
    assert report["eval"] == {BASE_LABEL: None, "full": None, "lora": None}
    assert report["settings"] == {"k": 10, "epsilon": 0.5, "align_k": 4, "targets": "all-linear"}
    lines = (out / "layers.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 37 and lines[0].startswith("model,name,type,depth")


@pytest.mark.parametrize("args, message", [
    (["--models", "{other}"], "the adapter was trained on smollm2-135m, not on --base minilm-l6"),
    (["--models", "{root}/missing"], "no such directory"),
    (["--models", "{full}", "{full}"], "given twice"),
    (["--models", "{lora}", "--data", "ptb"], "minilm-l6 is not a causal language model"),
    (["--models", "{lora}", "--epsilon", "1.5"], "--epsilon must be in (0, 1]"),
    (["--models", "{root}"], "not a model directory or an adapter directory"),
    (["--models", "{lora}", "--base", "{lora}"], "is an adapter directory"),
])
def test_cli_compare_bad_arguments_are_one_error_and_write_nothing(finetunes, tmp_path, args,
                                                                   message):
    from slimtune.cli import app

    root, full, lora, other = finetunes
    args = [a.format(root=root, full=full, lora=lora, other=other) for a in args]
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--base", "minilm-l6", *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_compare_smollm2_adapter_with_perplexity_and_nuclear_norm(smollm2, tmp_path):
    from slimtune import adapt
    from slimtune.cli import app

    model = adapt.apply(copy.deepcopy(smollm2[0]), "lora", r=8, targets=["q_proj", "v_proj"],
                        progress=False)
    g = torch.Generator().manual_seed(11)
    for p in adapt.trainable_parameters(model).values():
        p.data = 0.05 * torch.randn(p.shape, generator=g)
    adapter = adapt.save(model, tmp_path / "lora")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "-b", "smollm2-135m", "-m", str(adapter),
                                      "--data", "ptb", "--eval-tokens", "256", "--seqlen", "128",
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["summary"]["lora"]["changed_layers"] == 60
    evals = json.loads((out / "compare.json").read_text())["eval"]
    assert evals[BASE_LABEL]["windows"] == evals["lora"]["windows"] == 2
    assert 0 < evals["lora"]["nuclear_norm"] < 1
    assert evals["lora"]["perplexity"] != evals[BASE_LABEL]["perplexity"]
