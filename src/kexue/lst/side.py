"""The side network: reduced-width transformer blocks joined to the backbone by gated ladders.

Notation of ``docs/guides/lst.md`` ("The side network"). With backbone width ``d`` and side
width ``w = d / r``, one side stack computes

    h = down_0(e)                                     e: backbone token embeddings
    for side block j (matching backbone layer l_j):
        mu_j = sigmoid(alpha_j / T)                   alpha_j = 0 at init: mu_j = 0.5
        h = mu_j * h + (1 - mu_j) * down_j(b_{l_j})   b_l: output of backbone layer l
        h = block_j(h)

Two block styles mirror the supported backbones: ``"bert"`` (post-LayerNorm, biases,
attention scaled by ``1/sqrt(head size)``) and ``"t5"`` (pre-RMSNorm, no biases, unscaled
attention with a learned relative position bias, optional cross-attention, final norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class SideDims:
    """Shapes and style of the side blocks, derived from the backbone and ``r``."""

    style: str  # "bert" or "t5"
    backbone_width: int  # d
    width: int  # w = d / r
    heads: int  # kept from the backbone
    head_dim: int  # backbone head size / r
    ffn: int  # backbone FFN width / r
    eps: float
    activation: str
    gated: bool = False  # T5 v1.1 gated FFN: act(wi x) * (wi_lin x)
    buckets: int = 0  # T5 relative position buckets (0 = no position bias)
    max_distance: int = 128

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


class RMSNorm(nn.Module):
    """T5's norm: ``x / sqrt(mean(x^2) + eps) * weight`` (no mean subtraction, no bias)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # half precision squares in float32 (as T5 does); float32/float64 stay as they are
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(x.dtype)


def _norm(dims: SideDims) -> nn.Module:
    return (
        RMSNorm(dims.width, dims.eps) if dims.style == "t5" else nn.LayerNorm(dims.width, dims.eps)
    )


class SideAttention(nn.Module):
    """Multi-head attention of width ``w`` with ``heads`` heads of ``head_dim``."""

    def __init__(self, dims: SideDims) -> None:
        super().__init__()
        bias = dims.style == "bert"
        self.q = nn.Linear(dims.width, dims.inner, bias=bias)
        self.k = nn.Linear(dims.width, dims.inner, bias=bias)
        self.v = nn.Linear(dims.width, dims.inner, bias=bias)
        self.o = nn.Linear(dims.inner, dims.width, bias=bias)
        self.heads, self.head_dim = dims.heads, dims.head_dim
        # T5 folds the 1/sqrt(d_kv) into its initialisation; BERT scales explicitly.
        # No dropout on the attention weights: on CPUs drawing that mask costs more than the
        # whole attention of a side block, and the hidden-state dropout remains.
        self.scale = 1.0 if dims.style == "t5" else 1.0 / math.sqrt(dims.head_dim)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor, memory: Tensor | None = None) -> Tensor:
        source = x if memory is None else memory
        out = F.scaled_dot_product_attention(
            self._split(self.q(x)),
            self._split(self.k(source)),
            self._split(self.v(source)),
            attn_mask=bias,
            scale=self.scale,
        )
        return self.o(out.transpose(1, 2).flatten(2))


class SideFeedForward(nn.Module):
    def __init__(self, dims: SideDims, dropout: float) -> None:
        super().__init__()
        bias = dims.style == "bert"
        self.wi = nn.Linear(dims.width, dims.ffn, bias=bias)
        self.wi_lin = nn.Linear(dims.width, dims.ffn, bias=False) if dims.gated else None
        self.wo = nn.Linear(dims.ffn, dims.width, bias=bias)
        self.act = ACT2FN[dims.activation]
        self.drop = nn.Dropout(dropout) if dims.style == "t5" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi(x))
        if self.wi_lin is not None:
            h = h * self.wi_lin(x)
        return self.wo(self.drop(h))


class SideBlock(nn.Module):
    """One reduced-width transformer block (attention + FFN, optional cross-attention)."""

    def __init__(self, dims: SideDims, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.style = dims.style
        self.attn = SideAttention(dims)
        self.norm1 = _norm(dims)
        self.cross = SideAttention(dims) if cross else None
        self.norm_cross = _norm(dims) if cross else None
        self.ffn = SideFeedForward(dims, dropout)
        self.norm2 = _norm(dims)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        memory: Tensor | None = None,
        memory_bias: Tensor | None = None,
    ) -> Tensor:
        if self.style == "bert":  # post-norm
            x = self.norm1(x + self.drop(self.attn(x, bias)))
            return self.norm2(x + self.drop(self.ffn(x)))
        x = x + self.drop(self.attn(self.norm1(x), bias))
        if self.cross is not None:
            norm_cross = cast(nn.Module, self.norm_cross)  # built together with cross
            x = x + self.drop(self.cross(norm_cross(x), memory_bias, memory))
        return x + self.drop(self.ffn(self.norm2(x)))


def relative_position_bucket(
    relative: Tensor, *, bidirectional: bool, buckets: int, max_distance: int
) -> Tensor:
    """T5's bucketing of ``key - query`` offsets: exact for small offsets, log-spaced up to
    ``max_distance``; half the buckets per direction when ``bidirectional``."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    is_small = relative < exact
    far = (
        exact
        + (
            torch.log(relative.float().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (buckets - exact)
        ).long()
    )
    far = torch.clamp(far, max=buckets - 1)
    return out + torch.where(is_small, relative, far)


class SideStack(nn.Module):
    """One ladder: the down-projections, gates and side blocks beside one backbone stack."""

    def __init__(
        self,
        dims: SideDims,
        n_blocks: int,
        *,
        temperature: float,
        dropout: float,
        causal: bool = False,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.embed_down = nn.Linear(dims.backbone_width, dims.width)
        self.ladders = nn.ModuleList(
            nn.Linear(dims.backbone_width, dims.width) for _ in range(n_blocks)
        )
        self.alpha = nn.Parameter(torch.zeros(n_blocks))
        self.blocks = nn.ModuleList(SideBlock(dims, dropout, cross) for _ in range(n_blocks))
        self.final_norm = RMSNorm(dims.width, dims.eps) if dims.style == "t5" else nn.Identity()
        self.position_bias = nn.Embedding(dims.buckets, dims.heads) if dims.buckets else None
        self.dims, self.temperature, self.causal = dims, temperature, causal

    def gates(self) -> Tensor:
        """``mu_j = sigmoid(alpha_j / T)``, one per side block."""
        return torch.sigmoid(self.alpha / self.temperature)

    def _bias(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """Attention mask (batch, heads or 1, query or 1, key) from a key mask: boolean
        (True = attend) without position bias, else additive."""
        t = mask.shape[-1]
        keep = mask[:, None, None, :].bool()
        if self.causal:
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        if self.position_bias is None:
            return keep
        bias = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
        bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
        pos = torch.arange(t, device=mask.device)
        bucket = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=not self.causal,
            buckets=self.dims.buckets,
            max_distance=self.dims.max_distance,
        )
        return bias + self.position_bias(bucket).permute(2, 0, 1)[None].to(dtype)

    def forward(
        self,
        states: Tensor,
        mask: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """``states``: (1 + blocks, batch, seq, d) = embeddings, then the backbone outputs of
        the side layers; ``mask``: (batch, seq), 1 = token. Returns (batch, seq, w)."""
        dtype = self.embed_down.weight.dtype
        states = states.to(dtype)
        bias = self._bias(mask, dtype)
        # memory_mask comes with memory (LSTModel passes both)
        memory_bias = None if memory is None else cast(Tensor, memory_mask)[:, None, None, :].bool()
        h = self.embed_down(states[0])
        mu = self.gates()
        for j, block in enumerate(self.blocks):
            h = mu[j] * h + (1 - mu[j]) * self.ladders[j](states[j + 1])
            h = block(h, bias, memory, memory_bias)
        return self.final_norm(h)


def init_side_weights(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, std) weights, zero biases, unit norms; gates stay at alpha = 0."""
    for name, p in module.named_parameters():
        if name.endswith("alpha"):
            continue
        with torch.no_grad():
            if name.endswith("bias") and p.ndim == 1:
                p.zero_()
            elif p.ndim == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)


def pool(h: Tensor, mask: Tensor, how: str) -> Tensor:
    """(batch, seq, d) -> (batch, d): the mean over tokens with ``mask == 1``, or the first."""
    if how == "first":
        return h[:, 0]
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
