"""Initialising side blocks by structural pruning of the matching backbone blocks.

See ``docs/guides/lst.md``, "Initialisation by pruning". Side block ``j`` is cut out of
backbone layer ``l_j``: every weight matrix keeps ``1/r`` of its rows (output units), chosen by
importance, and the columns that match the rows kept upstream.

Importance of a weight entry ``w``:

- ``"fisher"``: diagonal empirical Fisher information ``F_w = sum_n (d loss_n / d w)^2`` over
  ``fisher_samples`` training examples, one example per backward pass. The task loss is the
  backbone's own LM loss for ``seq2seq-lm``; for classification a linear probe is first fitted
  on the frozen features of the same examples and its loss is differentiated.
- ``"magnitude"``: ``|w|`` (L1), no data needed.

Row choice (``R`` = the kept coordinates of the residual stream, shared by every block, since
a transformer's residual stream has one basis; ``importance[A]`` of rows summed over the kept
columns):

- ``R``: the ``d/r`` coordinates of largest total importance over every entry that reads them
  (columns of ``q, k, v, wi``), writes them (rows of ``o, wo``) or scales them (norms).
- ``q`` and ``k`` share their rows (their dot product needs the same coordinates), chosen per
  head: the ``head_dim/r`` rows of largest ``importance[q] + importance[k]`` in each head, so the
  head count is kept. ``v`` rows likewise per head; ``o`` takes ``v``'s rows as columns.
- ``wi`` (and T5's gated ``wi_lin``): the ``d_ff/r`` rows of largest importance; ``wo`` takes
  them as columns. ``o``, ``wo`` and the norms keep the rows ``R``.

The down-projections become coordinate selections ``x -> x[R]`` and the up-projection puts the
side state back on coordinates ``R``; T5's relative position biases are copied (head count
kept). ``PruningPlan`` records every choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kexue.lst.backbones import Backbone
from kexue.lst.data import right_pad
from kexue.lst.side import SideBlock, SideDims, SideStack, pool
from kexue.progress import progress_bar
from kexue.validation import check_class_labels

_READ = ("q", "k", "v", "wi", "wi_lin", "xq", "xk", "xv")  # columns on the residual stream
_WRITE = ("o", "wo", "xo")  # rows on the residual stream
_NORMS = ("norm1", "norm2", "norm_cross")


@dataclass
class PruningPlan:
    """The kept indices: ``residual`` (``R``), and per stack and side block the kept rows of
    ``qk``, ``v``, ``ffn`` (and ``xqk``, ``xv`` for T5 cross-attention)."""

    residual: Tensor
    layers: list[int]
    blocks: dict[str, list[dict[str, Tensor]]] = field(default_factory=dict)


Importance = dict[str, Tensor]  # "stack.layer.role.weight" -> importance, same shape


def _named(adapter: Backbone, layers: list[int]) -> dict[str, Tensor]:
    """The backbone parameters pruning reads, by "stack.layer.role.(weight|bias)"."""
    out = {}
    for stack, n in adapter.stacks().items():
        for layer in layers:
            if layer >= n:
                continue
            for role, module in adapter.block_modules(stack, layer).items():
                for kind in ("weight", "bias"):
                    p = getattr(module, kind, None)
                    if isinstance(p, Tensor):
                        out[f"{stack}.{layer}.{role}.{kind}"] = p
    return out


def magnitude_importance(adapter: Backbone, layers: list[int]) -> Importance:
    """``|w|`` for every weight and bias that pruning reads."""
    return {k: p.detach().abs() for k, p in _named(adapter, layers).items()}


def _examples(data: Iterable[dict[str, Tensor]], limit: int) -> Iterator[dict[str, Tensor]]:
    """Single examples from batches, right padding trimmed."""
    count = 0
    for batch in data:
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            raise ValueError(
                "init_data must yield dicts with at least 'input_ids' and 'labels' tensors"
            )
        n = batch["input_ids"].shape[0]
        for i in range(n):
            ex = {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, Tensor)}
            mask = ex.get("attention_mask")
            if mask is not None:
                t = int(mask.sum())
                if t > 0 and bool(mask[0, :t].all()):  # right padded: drop the padding
                    for k in ("input_ids", "attention_mask", "token_type_ids"):
                        if k in ex:
                            ex[k] = ex[k][:, :t]
                    if ex["labels"].ndim == 2 and ex["labels"].shape[1] == mask.shape[1]:
                        ex["labels"] = ex["labels"][:, :t]  # token labels
            yield ex
            count += 1
            if count >= limit:
                return


def _collate(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Right-pad single examples into one batch (labels of sequences with -100)."""
    out = {}
    for key in examples[0]:
        parts = [ex[key] for ex in examples]
        if parts[0].ndim < 2:
            out[key] = torch.cat(parts)
        else:
            fill = -100 if key == "labels" else 0
            out[key] = right_pad([p[0] for p in parts], value=fill)[0]
    return out


def _check_labels(examples: list[dict[str, Tensor]], task: str, num_labels: int, vocab) -> None:
    """Class labels in ``0..num_labels-1`` (token ids below ``vocab_size`` for seq2seq-lm)."""
    if task != "seq2seq-lm" and num_labels == 1:
        return  # regression targets
    labels = torch.cat([ex["labels"].reshape(-1) for ex in examples])
    count, name = (vocab, "vocab_size") if task == "seq2seq-lm" else (num_labels, "num_labels")
    if count is not None:
        check_class_labels(labels, count, "labels of init_data", count_name=name, ignore_index=-100)


def _encode(adapter: Backbone, batch: dict[str, Tensor]) -> Tensor:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if adapter.family == "t5":
        encoder = cast(nn.Module, adapter.model.encoder)  # checked by T5Backbone
        return encoder(**kwargs, return_dict=True).last_hidden_state
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return adapter.base(**kwargs, return_dict=True).last_hidden_state


def _features(h: Tensor, batch: dict[str, Tensor], task: str, pooling: str):
    """Probe inputs and targets: pooled states per example, or every labelled token."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(h.shape[:2], dtype=torch.long)
    if task == "token-classification":
        keep = batch["labels"] != -100
        return h[keep], batch["labels"][keep]
    return pool(h, mask, pooling), batch["labels"].reshape(-1)


def _fit_probe(x: Tensor, y: Tensor, num_labels: int) -> nn.Linear:
    """Linear probe on frozen features: ridge regression (1 label) or L2 logistic regression."""
    probe = nn.Linear(x.shape[1], num_labels)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_labels, requires_grad=True)
    b = torch.zeros(num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")
    target = y.float().reshape(-1, 1) if num_labels == 1 else y.long()

    def closure():
        opt.zero_grad()
        out = z @ w + b
        loss = F.mse_loss(out, target) if num_labels == 1 else F.cross_entropy(out, target)
        loss = loss + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the probe
        probe.weight.copy_((w / std[:, None]).T)
        probe.bias.copy_(b - (mean / std) @ w)
    return probe.requires_grad_(False)


def _example_losses(adapter, batch, task, num_labels, pooling, probe) -> Tensor:
    """Sum over the batch of each example's own loss (a mean over its tokens where it has
    several), so that the gradient of one example is its per-example gradient."""
    if task == "seq2seq-lm":
        logits = adapter.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            use_cache=False,
            return_dict=True,
        ).logits
        labels = batch["labels"]
    else:
        h = _encode(adapter, batch)
        if task == "token-classification":
            logits, labels = probe(h), batch["labels"]
        else:
            out = probe(pool(h, batch.get("attention_mask", torch.ones(h.shape[:2])), pooling))
            if num_labels == 1:
                return F.mse_loss(out.squeeze(-1), batch["labels"].float(), reduction="sum")
            return F.cross_entropy(out, batch["labels"].long(), reduction="sum")
    token = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    count = (labels != -100).sum(1)
    return (token.sum(1) / count.clamp_min(1))[count > 0].sum()


def _normalized(module: nn.Module, x: Tensor) -> Tensor:
    """The input of a norm layer before its affine part (``y = x_hat * weight + bias``)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _accumulate(fisher, key, module, x, g) -> None:
    """Add ``sum_n (dL_n/dw)^2`` of one module from its inputs ``x`` and output gradients
    ``g`` (batch, ..., features): per-example gradients are sums over the middle axes."""
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1]).to(g.dtype)
    g = g.reshape(b, -1, g.shape[-1])
    if isinstance(module, nn.Linear):
        weight = torch.einsum("bto,bti->boi", g, x)
    else:
        weight = (g * _normalized(module, x).to(g.dtype)).sum(1)
    fisher[f"{key}.weight"] += weight.square().sum(0)
    if f"{key}.bias" in fisher:
        fisher[f"{key}.bias"] += g.sum(1).square().sum(0)


def fisher_importance(
    adapter: Backbone,
    layers: list[int],
    data: Iterable[dict[str, Tensor]],
    *,
    samples: int,
    task: str,
    num_labels: int,
    pooling: str = "mean",
    batch_size: int = 4,
    progress: bool = True,
) -> Importance:
    """Diagonal empirical Fisher ``sum_n (d loss_n / d w)^2`` over up to ``samples`` examples.

    ``data`` yields batches (dicts with ``input_ids``, ``labels`` and optionally
    ``attention_mask``, ``token_type_ids``); they are split into single examples and
    re-batched ``batch_size`` at a time. Per-example gradients come out of one backward pass
    per batch: for a linear layer ``dL_n/dW = sum_t g_nt x_nt^T`` from its inputs ``x`` and
    output gradients ``g``, for a norm ``sum_t g_nt * x_hat_nt`` (padding gets zero gradient,
    so this equals one example per pass). The backbone is left exactly as it was (weights,
    ``requires_grad`` flags and ``.grad`` untouched). ``progress`` shows a bar over the
    backward passes. Labels outside ``0..num_labels-1`` raise ``ValueError`` naming
    ``num_labels``. See ``docs/guides/lst.md``, "Initialisation by pruning".
    """
    examples = list(_examples(data, samples))
    if not examples:
        raise ValueError("init_data yielded no examples for the Fisher pass")
    _check_labels(examples, task, num_labels, getattr(adapter.config, "vocab_size", None))
    params = _named(adapter, layers)
    modules = {}
    for stack, n in adapter.stacks().items():
        for layer in layers:
            if layer < n:
                for role, m in adapter.block_modules(stack, layer).items():
                    modules[f"{stack}.{layer}.{role}"] = m
    batches = [_collate(examples[k : k + batch_size]) for k in range(0, len(examples), batch_size)]
    probe = None
    if task != "seq2seq-lm":
        with torch.no_grad():
            feats = [_features(_encode(adapter, b), b, task, pooling) for b in batches]
        probe = _fit_probe(
            torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), num_labels
        )
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    flags = {k: p.requires_grad for k, p in params.items()}
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(key):
        def record(module, args, out):
            seen[key] = (args[0].detach(), out)

        return record

    handles = [m.register_forward_hook(hook(k)) for k, m in modules.items()]
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad(), progress_bar(disable=not progress) as bar:
            task_id = bar.add_task("Fisher pass", total=len(batches))
            for batch in batches:
                seen.clear()
                loss = _example_losses(adapter, batch, task, num_labels, pooling, probe)
                if loss.requires_grad:
                    keys = list(seen)
                    grads = torch.autograd.grad(
                        loss, [seen[k][1] for k in keys], allow_unused=True, materialize_grads=True
                    )
                    for key, g in zip(keys, grads, strict=True):
                        _accumulate(fisher, key, modules[key], seen[key][0], g.detach())
                seen.clear()
                bar.advance(task_id)
    finally:
        for h in handles:
            h.remove()
        for k, p in params.items():
            p.requires_grad_(flags[k])
    return fisher


def _rows(imp: Importance, key: str, cols: Tensor) -> Tensor:
    """Importance of each row of matrix ``key`` over the kept columns, plus its bias."""
    score = imp[f"{key}.weight"][:, cols].sum(1)
    bias = imp.get(f"{key}.bias")
    return score + bias if bias is not None else score


def _top_per_head(score: Tensor, heads: int, keep: int) -> Tensor:
    per_head = score.view(heads, -1)
    idx = per_head.topk(keep, dim=1).indices.sort(dim=1).values
    return (idx + torch.arange(heads)[:, None] * per_head.shape[1]).flatten()


def _top(score: Tensor, keep: int) -> Tensor:
    return score.topk(keep).indices.sort().values


def plan_pruning(
    importance: Importance, adapter: Backbone, layers: list[int], dims: SideDims
) -> PruningPlan:
    """Choose the kept rows of every matrix (see the module docstring)."""
    score = torch.zeros(dims.backbone_width)
    for key, value in importance.items():
        role, kind = key.split(".")[-2:]
        if role in _READ and kind == "weight":
            score += value.sum(0)
        elif role in _WRITE:
            score += value.sum(1) if kind == "weight" else value
        elif role in _NORMS:
            score += value
    residual = _top(score, dims.width)
    plan = PruningPlan(residual=residual, layers=list(layers))
    head_keep = dims.head_dim
    for stack, n in adapter.stacks().items():
        chosen = []
        for layer in layers:
            if layer >= n:
                continue
            base = f"{stack}.{layer}"
            rows = {
                "qk": _top_per_head(
                    _rows(importance, f"{base}.q", residual)
                    + _rows(importance, f"{base}.k", residual),
                    dims.heads,
                    head_keep,
                ),
                "v": _top_per_head(_rows(importance, f"{base}.v", residual), dims.heads, head_keep),
            }
            ffn = _rows(importance, f"{base}.wi", residual)
            if f"{base}.wi_lin.weight" in importance:
                ffn = ffn + _rows(importance, f"{base}.wi_lin", residual)
            rows["ffn"] = _top(ffn, dims.ffn)
            if f"{base}.xq.weight" in importance:
                rows["xqk"] = _top_per_head(
                    _rows(importance, f"{base}.xq", residual)
                    + _rows(importance, f"{base}.xk", residual),
                    dims.heads,
                    head_keep,
                )
                rows["xv"] = _top_per_head(
                    _rows(importance, f"{base}.xv", residual), dims.heads, head_keep
                )
            chosen.append(rows)
        plan.blocks[stack] = chosen
    return plan


def _copy_linear(dst: nn.Linear, src: nn.Module, rows: Tensor, cols: Tensor) -> None:
    # src: a backbone's linear layer (weight and bias are tensors)
    dst.weight.copy_(cast(Tensor, src.weight)[rows][:, cols])
    if dst.bias is not None and src.bias is not None:
        dst.bias.copy_(cast(Tensor, src.bias)[rows])


def _copy_norm(dst: nn.Module, src: nn.Module, keep: Tensor) -> None:
    # dst, src: norm layers (weight and bias are tensors)
    cast(Tensor, dst.weight).copy_(cast(Tensor, src.weight)[keep])
    if getattr(dst, "bias", None) is not None and getattr(src, "bias", None) is not None:
        cast(Tensor, dst.bias).copy_(cast(Tensor, src.bias)[keep])


def selection(width: int, keep: Tensor) -> Tensor:
    """The (len(keep), width) matrix with ``x -> x[keep]``."""
    return torch.eye(width)[keep]


@torch.no_grad()
def apply_pruning(
    stacks: dict[str, SideStack], up: nn.Linear, adapter: Backbone, plan: PruningPlan
) -> None:
    """Copy the pruned backbone weights into the side stacks (and set the projections)."""
    r = plan.residual
    pick = selection(up.out_features, r)
    up.weight.copy_(pick.T)
    up.bias.zero_()
    for stack, side in stacks.items():
        for proj in [side.embed_down, *side.ladders]:
            proj.weight.copy_(pick)
            proj.bias.zero_()
        layers = [layer for layer in plan.layers if layer < adapter.stacks()[stack]]
        blocks = cast("Iterable[SideBlock]", side.blocks)
        for block, layer, rows in zip(blocks, layers, plan.blocks[stack], strict=True):
            src = adapter.block_modules(stack, layer)
            _copy_linear(block.attn.q, src["q"], rows["qk"], r)
            _copy_linear(block.attn.k, src["k"], rows["qk"], r)
            _copy_linear(block.attn.v, src["v"], rows["v"], r)
            _copy_linear(block.attn.o, src["o"], r, rows["v"])
            _copy_norm(block.norm1, src["norm1"], r)
            _copy_linear(block.ffn.wi, src["wi"], rows["ffn"], r)
            if block.ffn.wi_lin is not None:
                _copy_linear(block.ffn.wi_lin, src["wi_lin"], rows["ffn"], r)
            _copy_linear(block.ffn.wo, src["wo"], r, rows["ffn"])
            _copy_norm(block.norm2, src["norm2"], r)
            if block.cross is not None:
                _copy_linear(block.cross.q, src["xq"], rows["xqk"], r)
                _copy_linear(block.cross.k, src["xk"], rows["xqk"], r)
                _copy_linear(block.cross.v, src["xv"], rows["xv"], r)
                _copy_linear(block.cross.o, src["xo"], r, rows["xv"])
                # norm_cross exists exactly when cross does (SideBlock)
                _copy_norm(cast(nn.Module, block.norm_cross), src["norm_cross"], r)
        extras = adapter.stack_extras(stack)
        if "final_norm" in extras:
            _copy_norm(side.final_norm, extras["final_norm"], r)
        if side.position_bias is not None and "position_bias" in extras:
            side.position_bias.weight.copy_(cast(Tensor, extras["position_bias"].weight))
