"""The factored linear layer every slimtune method produces.

    y = g ⊙ [x·(W_base ⊙ M)ᵀ + s·((x·Aᵀ)·Kᵀ)·Bᵀ + x·Sᵀ] + bias

- base: a module with ``dense_weight()``, ``forward(x)`` and ``add_(delta)`` (``DenseBase`` here; a
  packed quantised base implements the same three methods). It may be absent (pure low-rank, as
  compression leaves a layer).
- M: an optional fixed mask on the base (pruning), stored as a bitmask (``mask_bits``, uint8
  ``[out, ceil(in/8)]``, :func:`slimtune.weights.packing.pack_mask`); ``mask`` unpacks it.
- low-rank: ``LowRank`` holds A (r×in), B (out×r), an optional core K (none, diagonal or r×r) and
  the scale s. Any module with ``forward(x)``, ``delta_weight()`` and ``rank`` can take its place
  (generated factors, DoRA-style transforms are added that way, never as branches in forward).
- S: an optional sparse delta stored as flat indices + values.
- g: an optional whole-weight transform, a module with ``output_scale(layer) -> [out]`` computed
  from the layer's combined weight (DoRA's magnitude over the row norm); ``merge`` folds it in.
- origin: an optional frozen ``LowRank`` recording how an adapter initialisation changed the base
  (``W_base = W_original - origin.delta_weight()``, PiSSA and friends; a frozen ``SparseDelta``
  when a method merged sparse updates into the base, as SaRA's re-selection). It takes no part in
  forward; saving an adapter and exporting it to PEFT read it.

``merge()`` folds the low-rank and sparse parts into the base, ``unmerge()`` takes them out again,
``to_dense()`` returns an ordinary ``nn.Linear``. ``describe()`` gives a JSON-able structure from
which ``FactoredLinear.from_description`` rebuilds an empty layer whose ``load_state_dict`` then
restores it exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.layers.bases import DenseBase, build_base
from slimtune.layers.parts import (LowRank, SparseDelta, build_transform, describe_lowrank,
                                   empty_lowrank)
from slimtune.weights.packing import pack_mask, unpack_mask


class FactoredLinear(nn.Module):
    """A linear layer as base (optionally masked) + low-rank + sparse + bias."""

    def __init__(self, in_features: int, out_features: int, base: nn.Module | None = None,
                 lowrank: nn.Module | None = None, sparse: SparseDelta | None = None,
                 mask: Tensor | None = None, bias: Tensor | None = None,
                 transform: nn.Module | None = None, origin: LowRank | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if base is None and lowrank is None and sparse is None:
            raise ValueError("a FactoredLinear needs at least one of base, lowrank, sparse")
        if mask is not None and base is None:
            raise ValueError("a mask applies to the base weight; there is no base")
        if origin is not None and base is None:
            raise ValueError("an origin records a change of the base weight; there is no base")
        self.base, self.lowrank, self.sparse = base, lowrank, sparse
        self.register_buffer("mask_bits", None if mask is None else self._packed_mask(mask))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.transform, self.origin = transform, origin
        if origin is not None:
            origin.requires_grad_(False)
        self.register_buffer("merge_scale", None)  # the transform's scale at merge time
        self.merged = False
        self._merge_made_base = False  # merge gave a layer without a base one; unmerge drops it
        self._mask_check: tuple | None = None  # (tensor versions, mask changes nothing)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **parts) -> "FactoredLinear":
        """Wrap an ``nn.Linear``; its weight becomes the frozen dense base (shared, not copied)."""
        bias = None if linear.bias is None else linear.bias.data
        return cls(linear.in_features, linear.out_features, base=DenseBase(linear.weight.data),
                   bias=bias, **parts)

    def _packed_mask(self, mask: Tensor) -> Tensor:
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a mask must have the weight's shape ({self.out_features}, "
                             f"{self.in_features}), got {tuple(mask.shape)}")
        return pack_mask(mask if mask.dtype == torch.bool else mask != 0)

    @property
    def mask(self) -> Tensor | None:
        """The base's mask as a bool ``[out, in]`` tensor (True = kept), or None."""
        return None if self.mask_bits is None else unpack_mask(self.mask_bits, self.in_features)

    @mask.setter
    def mask(self, mask: Tensor | None) -> None:
        self.set_mask(mask)

    def set_mask(self, mask: Tensor | None) -> None:
        """Replace the mask (bool or 0/1 ``[out, in]``; None removes it)."""
        if mask is not None and self.base is None:
            raise ValueError("a mask applies to the base weight; there is no base")
        device = next(iter(self.base.state_dict().values())).device
        self.mask_bits = None if mask is None else self._packed_mask(mask).to(device)

    # -- weights -----------------------------------------------------------------------------
    def base_weight(self) -> Tensor | None:
        """The base as a dense tensor with the mask applied (None if there is no base)."""
        if self.base is None:
            return None
        W = self.base.dense_weight()
        if self.mask_bits is None or self.merged:
            return W
        return torch.where(self.mask, W, torch.zeros((), dtype=W.dtype, device=W.device))

    def delta_weight(self) -> Tensor | None:
        """The low-rank plus sparse update as a dense out × in tensor (None if neither)."""
        parts = [p.delta_weight() for p in (self.lowrank, self.sparse) if p is not None]
        return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def combined_weight(self) -> Tensor:
        """Masked base plus low-rank plus sparse, before any transform (unmerged layers)."""
        W, D = self.base_weight(), self.delta_weight()
        return D if W is None else W if D is None else W + D

    def dense_weight(self) -> Tensor:
        """The weight this layer applies, as one dense tensor."""
        if self.merged:
            return self.base.dense_weight()
        W = self.combined_weight()
        return W if self.transform is None else self.transform.output_scale(self)[:, None] * W

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        dtype = self._param_dtype()
        h = x if x.dtype == dtype else x.to(dtype)
        if self.merged:
            out = self.base(h)
        else:
            out = None
            if self.base is not None:
                out = (self.base(h) if self.mask_bits is None or self._mask_is_free()
                       else F.linear(h, self.base_weight().to(h.dtype)))
            for part in (self.lowrank, self.sparse):
                if part is not None:
                    out = part(h, out)
            if self.transform is not None:
                out = out * self.transform.output_scale(self)
        if self.bias is not None:
            out = out + self.bias
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @torch.no_grad()
    def _mask_is_free(self) -> bool:
        """True when applying the mask changes nothing: no base tensor trains and the base is
        already zero wherever the mask is False (as pruning leaves it). Checked once per version
        of the base and mask tensors, so a pruned layer's forward is the base's own (its packed
        kernels included) instead of unpacking the mask on every call. In-place edits through
        ``tensor.data`` bypass the version counters; edit bases with in-place ops under
        ``torch.no_grad()`` (as ``add_``, ``load_state_dict`` and optimisers do)."""
        tensors = (*self.base.parameters(), *self.base.buffers(), self.mask_bits)
        if any(t.requires_grad for t in tensors):
            return False
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._mask_check is None or self._mask_check[0] != key:
            dropped = self.base.dense_weight().masked_select(~self.mask)
            self._mask_check = (key, not bool(dropped.any()))
        return self._mask_check[1]

    def _param_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its first floating parameter's, else its first
        floating buffer's (a packed base's scales), else float32."""
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    # -- merge / unmerge / export ------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold low-rank and sparse parts (and the transform) into the base (mask applied first)."""
        if self.merged:
            return
        D = self.delta_weight()
        g = None if self.transform is None else self.transform.output_scale(self).detach().clone()
        if self.base is None:  # unmerge removes it again
            ref = next(self.parameters())
            self.base = DenseBase(torch.zeros(self.out_features, self.in_features,
                                              dtype=ref.dtype, device=ref.device))
            self._merge_made_base = True
        elif self.mask_bits is not None:
            self.base.add_(self.base_weight() - self.base.dense_weight())
        if D is not None:
            self.base.add_(D)
        if g is not None:
            self.base.add_((g[:, None] - 1) * self.base.dense_weight())
            self.merge_scale = g
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: the base returns to its masked value (masked entries are zero); a
        layer that had no base before ``merge`` has none again."""
        if not self.merged:
            return
        if self._merge_made_base:  # the layer had no base: it gets none back (exactly)
            self.base, self.merge_scale, self.merged = None, None, False
            self._merge_made_base = False
            return
        if self.merge_scale is not None:
            self.base.add_((1 / self.merge_scale[:, None] - 1) * self.base.dense_weight())
            self.merge_scale = None
        D = self.delta_weight()
        if D is not None:
            self.base.add_(-D)
        self.merged = False

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        W = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=W.device, dtype=W.dtype)
        linear.weight.copy_(W)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # -- structure (for saving) --------------------------------------------------------------
    def describe(self) -> dict:
        """A JSON-able description of this layer's structure (not its values)."""
        lr = self.lowrank
        return {
            "in_features": self.in_features, "out_features": self.out_features,
            "base": None if self.base is None else self.base.kind,
            **({"base_config": self.base.config()} if hasattr(self.base, "config") else {}),
            "mask": self.mask_bits is not None, "bias": self.bias is not None,
            "merged": self.merged,
            "lowrank": None if lr is None else describe_lowrank(lr),
            "sparse_nnz": None if self.sparse is None else self.sparse.nnz,
            "transform": None if self.transform is None else self.transform.describe(),
            "origin": None if self.origin is None else describe_lowrank(self.origin),
        }

    @classmethod
    def from_description(cls, d: dict, dtype=torch.float32, device=None) -> "FactoredLinear":
        """An uninitialised layer with the structure ``describe()`` reported (load values next)."""
        n_in, n_out = d["in_features"], d["out_features"]
        kw = {"dtype": dtype, "device": device}
        base = (None if d["base"] is None
                else build_base(d["base"], n_out, n_in, d.get("base_config"), **kw))
        lowrank = (None if d["lowrank"] is None
                   else empty_lowrank(d["lowrank"], n_in, n_out, kw))
        sparse = None
        if d["sparse_nnz"] is not None:
            n = d["sparse_nnz"]
            sparse = SparseDelta((n_out, n_in), torch.zeros(n, dtype=torch.long, device=device),
                                 torch.empty(n, **kw))
        mask = (torch.ones(n_out, n_in, dtype=torch.bool, device=device) if d["mask"]
                else None)
        bias = torch.empty(n_out, **kw) if d["bias"] else None
        transform = (None if d.get("transform") is None
                     else build_transform(d["transform"], n_out, **kw))
        origin = None if d.get("origin") is None else empty_lowrank(d["origin"], n_in, n_out, kw)
        layer = cls(n_in, n_out, base, lowrank, sparse, mask, bias, transform, origin)
        layer.merged = d.get("merged", False)
        if layer.merged and transform is not None:
            layer.merge_scale = torch.empty(n_out, **kw)
        return layer

    def extra_repr(self) -> str:
        d = self.describe()
        return (f"in={self.in_features}, out={self.out_features}, base={d['base']}, "
                f"rank={None if self.lowrank is None else self.lowrank.rank}, "
                f"sparse_nnz={d['sparse_nnz']}, mask={d['mask']}, merged={self.merged}")
