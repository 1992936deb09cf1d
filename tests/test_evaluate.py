"""slimtune.evaluate: perplexity parity with a plain transformers loop, windowing, costs; spectra."""
import math

import pytest
import torch
from torch import nn

from slimtune.analyze.spectra import layer_spectra, layer_type_and_depth, plot_spectra
from slimtune.evaluate import (accuracy, bytes_on_disk, parameter_count, peak_rss_mb, perplexity,
                               tokenize_text)
from slimtune.targets import replace_linears


def plain_transformers_perplexity(model, ids, seqlen, n_windows):
    """The textbook loop, written independently: HF's loss is the mean over seqlen-1 predictions;
    all windows score equally many tokens, so their losses are averaged with equal weights."""
    losses = []
    with torch.no_grad():
        for i in range(n_windows):
            window = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            losses.append(model(window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_plain_transformers_loop(smollm2, ptb_test_ids):
    model, _ = smollm2
    result = perplexity(model, ptb_test_ids, seqlen=256, max_tokens=4 * 256, progress=False)
    reference = plain_transformers_perplexity(model, ptb_test_ids, 256, 4)
    assert result["perplexity"] == pytest.approx(reference, rel=1e-4)
    assert (result["windows"], result["tokens"], result["seqlen"]) == (4, 4 * 255, 256)
    assert result["nll"] == pytest.approx(math.log(result["perplexity"]))
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 100


@pytest.mark.slow
def test_perplexity_ptb_reference_40x512(smollm2, ptb_test_ids):
    model, _ = smollm2
    result = perplexity(model, ptb_test_ids, seqlen=512, max_tokens=40 * 512, progress=False)
    reference = plain_transformers_perplexity(model, ptb_test_ids, 512, 40)
    assert result["perplexity"] == pytest.approx(reference, rel=1e-4)
    assert result["perplexity"] == pytest.approx(57.5, abs=0.5)  # DATA.md reference


def test_batched_windows_give_the_same_perplexity(smollm2, ptb_test_ids):
    model, _ = smollm2
    one = perplexity(model, ptb_test_ids, seqlen=64, max_tokens=3 * 64, progress=False)
    two = perplexity(model, ptb_test_ids, seqlen=64, max_tokens=3 * 64, batch_size=2, progress=False)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert two["windows"] == 3


class UniformLM(nn.Module):
    """Equal logits for every token: the perplexity is exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        return type("Output", (), {"logits": logits})()


def test_windows_drop_the_incomplete_tail():
    ids = torch.arange(1000) % 50
    result = perplexity(UniformLM(50), ids, seqlen=300, progress=False)
    assert result["windows"] == 3 and result["tokens"] == 3 * 299
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-6)
    capped = perplexity(UniformLM(50), ids, seqlen=300, max_tokens=650, progress=False)
    assert capped["windows"] == 2


def test_perplexity_rejects_bad_input():
    model = UniformLM(10)
    with pytest.raises(ValueError, match="at least seqlen"):
        perplexity(model, torch.arange(10), seqlen=11, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity(model, torch.arange(100) % 10, seqlen=20, max_tokens=19, progress=False)
    with pytest.raises(ValueError, match="1-D LongTensor"):
        perplexity(model, torch.zeros(2, 50, dtype=torch.long), seqlen=10, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(model, torch.arange(10), seqlen=1, progress=False)


def test_tokenize_text_adds_no_special_tokens_and_no_length_warning(minilm, capfd):
    _, tokenizer = minilm  # BERT's tokenizer would add [CLS] ... [SEP] and warn above 512 tokens
    ids = tokenize_text(tokenizer, "the cat sat " * 400)
    assert ids.dtype == torch.long and ids.ndim == 1 and ids.numel() == 1200
    assert tokenizer.cls_token_id not in ids.tolist() and tokenizer.sep_token_id not in ids.tolist()
    assert "longer than the specified maximum" not in capfd.readouterr().err


class KeywordClassifier(nn.Module):
    """Class 1 iff the token for "great" appears: a deterministic classifier with ``.logits``."""

    def __init__(self, token_id):
        super().__init__()
        self.token_id = token_id
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hit = (input_ids == self.token_id).any(dim=1).float()
        return type("Output", (), {"logits": torch.stack([1 - hit, hit], dim=1) + self.anchor})()


def test_accuracy_of_a_keyword_classifier(minilm):
    _, tokenizer = minilm
    model = KeywordClassifier(tokenizer.convert_tokens_to_ids("great"))
    texts = ["this is great", "quite bad", "great value, great taste", "not good at all", "fine"]
    labels = [1, 0, 1, 0, 1]  # the last one is missed
    assert accuracy(model, tokenizer, texts, labels, batch_size=2) == {"accuracy": 0.8, "n": 5}


def test_costs(smollm2, tmp_path):
    model, _ = smollm2
    assert parameter_count(model) == 134_515_008  # tied embeddings counted once (DATA.md)
    assert peak_rss_mb() > 100
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 32)
    assert bytes_on_disk(tmp_path) == 42 and bytes_on_disk(tmp_path / "a.bin") == 10
    with pytest.raises(FileNotFoundError):
        bytes_on_disk(tmp_path / "missing")


# -- spectra ----------------------------------------------------------------------------------
class TinyBlocks(nn.Module):
    """Embedding, two blocks of one 6×5 projection each, and an LM head."""

    def __init__(self, weights):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(5, 6, bias=False)})
                                    for _ in weights)
        for block, w in zip(self.layers, weights):
            block["proj"].weight.data.copy_(w)
        self.lm_head = nn.Linear(5, 7, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def matrix_with_singular_values(s, m=6, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def test_layer_spectra_on_known_matrices(tmp_path):
    s = [4.0, 2.0, 1.0, 0.0, 0.0]
    model = TinyBlocks([matrix_with_singular_values(s[:3]), matrix_with_singular_values([3.0] * 5)])
    rows = layer_spectra(model, progress=False)
    assert [r["name"] for r in rows] == ["layers.0.proj", "layers.1.proj"]  # no embed, no lm_head
    first, flat = rows
    assert (first["type"], first["depth"], first["shape"]) == ("proj", 0, [6, 5])
    torch.testing.assert_close(first["singular_values"], torch.tensor(s), atol=1e-5, rtol=0)
    assert first["stable_rank"] == pytest.approx(21 / 16, rel=1e-5)
    p = torch.tensor([4.0, 2.0, 1.0]) / 7
    assert first["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert first["energy_r8"] == pytest.approx(1.0)
    assert flat["stable_rank"] == pytest.approx(5.0, rel=1e-5)
    assert flat["effective_rank"] == pytest.approx(5.0, rel=1e-5)

    replace_linears(model, ["proj"])  # factored layers are read through their dense weight
    again = layer_spectra(model, progress=False)
    torch.testing.assert_close(again[0]["singular_values"], first["singular_values"])

    png = plot_spectra(rows, tmp_path / "plots" / "spectra.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["spectra.png"]  # no temp file left behind


def test_layer_type_and_depth():
    assert layer_type_and_depth("model.layers.3.self_attn.q_proj") == ("self_attn.q_proj", 3)
    assert layer_type_and_depth("encoder.layer.0.attention.output.dense") == ("attention.output.dense", 0)
    assert layer_type_and_depth("pooler.dense") == ("pooler.dense", None)
