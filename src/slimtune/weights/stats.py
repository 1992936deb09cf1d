"""Streaming statistics of layer inputs and gradients, for activation-aware factorisations.

- :class:`InputStatistics` accumulates, over batches of a linear layer's inputs ``X`` (any leading
  dims, last dim = in-features), the Gram matrix ``X^T X`` (SVD-LLM whitening, via
  :func:`slimtune.weights.svd.whitening_factor`), per-column sums of ``|x|`` (ASVD's activation
  scaling) and of ``x^2`` (the Gram's diagonal when the Gram is tracked), and the token count. The running sums equal the one-shot computation over
  the concatenated batches (up to floating-point summation order).
- :class:`FisherDiagonal` accumulates squared gradients per weight, the empirical Fisher diagonal
  used by Fisher-weighted SVD (FWSVD, Hsu et al. 2022).

Plain objects, not ``nn.Module``: feed them tensors, e.g. from a forward/backward hook.
"""
from __future__ import annotations

import contextlib

import torch

GRAM_BLOCK = 128  # rows of X^T X per product: only blocks on or above the diagonal are computed
GRAM_BLOCK_LOW = 256  # the same with bfloat16 products (faster in larger blocks)


def bfloat16_math(device: torch.device) -> bool:
    """Whether oneDNN's bf16 math mode keeps float32 accumulation here: CPUs with AMX tiles only
    (on an AVX512-BF16 CPU without AMX it moved a 5,000-token Gram by 2.7e-4, bfloat16-level)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and amx is not None and bool(amx())


@contextlib.contextmanager
def bfloat16_products(device: torch.device):
    """Float32 matrix products inside run with bfloat16 inputs and float32 accumulation and
    results where :func:`bfloat16_math` holds (oneDNN's bf16 math mode, TF32-like); elsewhere
    nothing changes."""
    if not bfloat16_math(device):
        yield
        return
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


class InputStatistics:
    """Running ``X^T X``, per-column ``sum |x|`` and ``sum x^2``, and token count of layer inputs.

    ``dtype`` is the accumulation dtype (float64 by default, so long streams do not lose precision);
    ``device`` is where the sums live (inputs are moved there). ``track_gram=False`` skips the
    ``[n, n]`` Gram matrix when only the per-column statistics are needed; ``track_abs=False``
    skips ``sum |x|`` (only ASVD's scaling reads it). ``gram_sum`` holds the blocks on and above
    the diagonal (``GRAM_BLOCK`` rows at a time; about 70% of the time of the full product on 2
    cores); :meth:`gram` returns the full symmetric matrix, and ``sq_sum`` is its diagonal when
    it is tracked (no separate pass over the inputs).

    ``product_dtype=torch.bfloat16`` (float32 sums only): the Gram's products round their inputs
    to bfloat16 and accumulate in float32 (:func:`bfloat16_products`, 2-3x faster on CPUs with
    AMX; elsewhere the inputs are rounded explicitly and multiplied in float32). Rounding the inputs of a damped Hessian this way moved SparseGPT's layer errors on
    SmolLM2 by at most 1.3%; a plain bfloat16 matmul, whose result is rounded to bfloat16 too,
    moved them up to 4.4x (the large entries' rounding swamps the damping).
    """

    def __init__(self, n_features: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None, track_gram: bool = True,
                 track_abs: bool = True, product_dtype: torch.dtype | None = None):
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        product_dtype = dtype if product_dtype is None else product_dtype
        if product_dtype not in (dtype, torch.bfloat16) or (
                product_dtype == torch.bfloat16 and dtype != torch.float32):
            raise ValueError(f"product_dtype must be dtype ({dtype}) or, with float32 sums, "
                             f"torch.bfloat16; got {product_dtype}")
        self.n_features = n_features
        self.dtype, self.product_dtype = dtype, product_dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.gram_sum = (torch.zeros(n_features, n_features, dtype=dtype, device=self.device)
                         if track_gram else None)
        self.abs_sum = (torch.zeros(n_features, dtype=dtype, device=self.device)
                        if track_abs else None)
        self._sq_sum = (torch.zeros(n_features, dtype=dtype, device=self.device)
                        if self.gram_sum is None else None)
        self.n_tokens = 0

    @property
    def sq_sum(self) -> torch.Tensor:
        """Per-column ``sum x^2``, ``[n]`` (a copy of the Gram's diagonal when it is tracked)."""
        return self._sq_sum if self.gram_sum is None else self.gram_sum.diagonal().clone()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` of shape ``[..., n_features]`` (every leading index is a token)."""
        if x.shape[-1] != self.n_features:
            raise ValueError(f"expected last dim {self.n_features}, got shape {tuple(x.shape)}")
        tokens = x.detach().reshape(-1, self.n_features).to(device=self.device, dtype=self.dtype)
        if self.gram_sum is not None:
            self._add_gram(tokens)
        if self.abs_sum is not None:
            self.abs_sum += tokens.abs().sum(dim=0)
        if self._sq_sum is not None:
            self._sq_sum += tokens.square().sum(dim=0)
        self.n_tokens += tokens.shape[0]

    def _add_gram(self, tokens: torch.Tensor) -> None:
        """Add ``tokens^T tokens`` to the upper block triangle of the sums."""
        low = self.product_dtype != self.dtype
        rows = GRAM_BLOCK_LOW if low else GRAM_BLOCK
        if low and not bfloat16_math(tokens.device):  # the same products: inputs rounded here
            tokens = tokens.to(self.product_dtype).to(self.dtype)
        with bfloat16_products(tokens.device) if low else contextlib.nullcontext():
            for i in range(0, self.n_features, rows):
                self.gram_sum[i:i + rows, i:].addmm_(tokens[:, i:i + rows].mT, tokens[:, i:])

    def _require_tokens(self) -> None:
        if self.n_tokens == 0:
            raise ValueError("no inputs accumulated yet: call update() first")

    def gram(self) -> torch.Tensor:
        """The raw Gram matrix ``X^T X`` summed over all tokens, ``[n, n]``."""
        if self.gram_sum is None:
            raise ValueError("Gram matrix not tracked (created with track_gram=False)")
        upper = self.gram_sum.triu()
        return upper + upper.triu(1).mT

    def covariance(self) -> torch.Tensor:
        """Uncentred second moment ``X^T X / n_tokens``, ``[n, n]``."""
        self._require_tokens()
        return self.gram() / self.n_tokens

    def mean_abs(self) -> torch.Tensor:
        """Per-column mean absolute input ``sum |x| / n_tokens``, ``[n]`` (ASVD's scaling base)."""
        self._require_tokens()
        if self.abs_sum is None:
            raise ValueError("sum |x| not tracked (created with track_abs=False)")
        return self.abs_sum / self.n_tokens

    def sq_norm(self) -> torch.Tensor:
        """Per-column squared norm ``sum x^2`` over all tokens, ``[n]`` (the diagonal of ``X^T X``)."""
        return self.sq_sum

    def merge(self, other: InputStatistics) -> None:
        """Add another accumulator's sums into this one (e.g. from another process or shard)."""
        if other.n_features != self.n_features:
            raise ValueError(f"feature counts differ: {self.n_features} vs {other.n_features}")
        if (self.gram_sum is None) != (other.gram_sum is None):
            raise ValueError("cannot merge accumulators with and without a Gram matrix")
        if (self.abs_sum is None) != (other.abs_sum is None):
            raise ValueError("cannot merge accumulators with and without sum |x|")
        if self.gram_sum is not None:
            self.gram_sum += other.gram_sum.to(self.gram_sum)
        else:
            self._sq_sum += other._sq_sum.to(self._sq_sum)
        if self.abs_sum is not None:
            self.abs_sum += other.abs_sum.to(self.abs_sum)
        self.n_tokens += other.n_tokens


class FisherDiagonal:
    """Running sum of squared gradients per weight and the number of gradients added.

    ``fisher()`` is the empirical Fisher diagonal ``sum g^2 / count``; ``row_importance()`` sums it
    over the input dimension (one importance per output row).
    """

    def __init__(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sq_grad_sum = torch.zeros(tuple(shape), dtype=dtype, device=self.device)
        self.count = 0

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        """Add one gradient (e.g. ``weight.grad`` after a backward pass) of the tracked shape."""
        if grad.shape != self.sq_grad_sum.shape:
            raise ValueError(f"expected gradient shape {tuple(self.sq_grad_sum.shape)}, "
                             f"got {tuple(grad.shape)}")
        self.sq_grad_sum += grad.detach().to(self.sq_grad_sum).square()
        self.count += 1

    def fisher(self) -> torch.Tensor:
        """Mean squared gradient per weight, same shape as the weight."""
        if self.count == 0:
            raise ValueError("no gradients accumulated yet: call update() first")
        return self.sq_grad_sum / self.count

    def row_importance(self) -> torch.Tensor:
        """Per-output-row importance ``sum_j F[i, j]`` for a 2-D weight, ``[out]``."""
        if self.sq_grad_sum.ndim != 2:
            raise ValueError("row_importance needs a 2-D weight")
        return self.fisher().sum(dim=1)
