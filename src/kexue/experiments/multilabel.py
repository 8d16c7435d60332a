"""Multi-label comparison harness: the same MLP trained with different losses, then scored.

Used by the tour's ``losses`` section (built-in MNIST canvases) and by
``benchmarks/losses.py`` (BibTeX). Baselines: BCE (threshold 0.5, and a threshold tuned on
validation), sigmoid focal loss (Lin et al., 2017), asymmetric loss (ASL, Ridnik et al.,
2021); kexue: ZLPR (threshold 0, untuned; and tuned, for reference), ZLPR with label
smoothing, ZLPR with mixup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kexue.extras import require
from kexue.losses import label_smoothing, mixup, zlpr_loss

_metrics = require("torchmetrics.functional.classification", "tour", "kexue.experiments")
binary_calibration_error = _metrics.binary_calibration_error
multilabel_average_precision = _metrics.multilabel_average_precision
multilabel_f1_score = _metrics.multilabel_f1_score

# ---------------------------------------------------------------- baseline losses
# Each loss maps (scores, float target) to a scalar: summed over classes, mean over rows.


def bce_loss(scores: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(scores, target, reduction="sum") / len(scores)


def focal_loss(scores: Tensor, target: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Sigmoid focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (RetinaNet's defaults)."""
    ce = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    p = torch.sigmoid(scores)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum() / len(scores)


def asymmetric_loss(
    scores: Tensor,
    target: Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
) -> Tensor:
    """ASL: ``-t (1-p)^g+ log p - (1-t) p_m^g- log(1 - p_m)``, ``p_m = max(p - clip, 0)``."""
    p = torch.sigmoid(scores)
    p_m = (p - clip).clamp_min(0.0)
    log_p = F.logsigmoid(scores)
    log_1m_pm = torch.log1p(-p_m.clamp(max=1 - 1e-6))
    pos = target * (1 - p) ** gamma_pos * log_p
    neg = (1 - target) * p_m**gamma_neg * log_1m_pm
    return -(pos + neg).sum() / len(scores)


def zlpr_objective(scores: Tensor, target: Tensor) -> Tensor:
    return zlpr_loss(scores, target, reduction="mean")


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A training loss plus how its scores turn into probabilities and decisions."""

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    prob: Callable[[Tensor], Tensor]
    threshold: float | None = 0.5  # on probabilities; None = tune on validation
    smoothing: float = 0.0
    mixup_alpha: float = 0.0
    family: str = ""  # methods of one family share a trained model when only thresholds differ


def _sigmoid(s: Tensor) -> Tensor:
    return torch.sigmoid(s)


def _sigmoid2(s: Tensor) -> Tensor:
    return torch.sigmoid(2 * s)


METHODS: list[Method] = [
    Method("BCE (t=0.5)", bce_loss, _sigmoid, 0.5, family="bce"),
    Method("BCE (tuned t)", bce_loss, _sigmoid, None, family="bce"),
    Method("focal (t=0.5)", focal_loss, _sigmoid, 0.5),
    Method("ASL (t=0.5)", asymmetric_loss, _sigmoid, 0.5),
    Method("ZLPR (s>0)", zlpr_objective, _sigmoid2, 0.5, family="zlpr"),
    Method("ZLPR (tuned t)", zlpr_objective, _sigmoid2, None, family="zlpr"),
    Method("ZLPR + smoothing 0.1", zlpr_objective, _sigmoid2, 0.5, smoothing=0.1),
    Method("ZLPR + mixup 0.4", zlpr_objective, _sigmoid2, 0.5, mixup_alpha=0.4),
]


@dataclass
class Split:
    x: Tensor  # (N, d) float32
    y: Tensor  # (N, n) float32 in {0, 1}


@dataclass
class MultilabelTrainConfig:
    """The MLP and optimiser of one multi-label training run (same for every loss)."""

    hidden: int = 512
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


def make_mlp(d: int, n: int, cfg: MultilabelTrainConfig) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, n)
    )


def train_scores(
    method: Method,
    train: Split,
    evals: list[Tensor],
    cfg: MultilabelTrainConfig,
    seed: int,
    on_epoch: Callable[[], None] | None = None,
) -> list[Tensor]:
    """Train one MLP with ``method``'s loss; return its scores on each tensor of ``evals``.

    All randomness (init, dropout, shuffling, mixup) comes from ``seed``; the global RNG
    state is restored afterwards.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_mlp(train.x.shape[1], train.y.shape[1], cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        n = len(train.x)
        for _ in range(cfg.epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                xb, yb = train.x[idx], train.y[idx]
                if method.mixup_alpha > 0:
                    xb, yb = mixup(xb, yb, method.mixup_alpha, generator=gen)
                if method.smoothing > 0:
                    yb = label_smoothing(yb, method.smoothing)
                loss = method.loss(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if on_epoch is not None:
                on_epoch()
        model.eval()
        with torch.no_grad():
            return [model(x) for x in evals]


# ---------------------------------------------------------------- metrics


def tune_threshold(probs: Tensor, y: Tensor) -> float:
    """The single probability threshold maximising micro-F1 on (validation) data."""
    grid = [round(0.02 * i, 2) for i in range(1, 50)]
    f1 = [float(multilabel_f1_score(probs, y.long(), y.shape[1], t, "micro")) for t in grid]
    return float(grid[int(np.argmax(f1))])


def scores_metrics(probs: Tensor, y: Tensor, threshold: float) -> dict[str, float]:
    """micro-F1, macro-F1 (over classes with a positive in ``y``), mAP, ECE of ``probs``."""
    labels = y.long()
    n = y.shape[1]
    present = y.sum(0) > 0
    k = int(present.sum())
    p_present, y_present = probs[:, present], labels[:, present]
    return {
        "micro_f1": float(multilabel_f1_score(probs, labels, n, threshold, average="micro")),
        "macro_f1": float(multilabel_f1_score(p_present, y_present, k, threshold, "macro")),
        "mAP": float(multilabel_average_precision(p_present, y_present, k, average="macro")),
        "ece": float(binary_calibration_error(probs.flatten(), labels.flatten(), n_bins=15)),
    }


def reliability_curve(probs: Tensor, y: Tensor, bins: int = 15) -> tuple[np.ndarray, ...]:
    """Per bin of predicted probability: mean prediction, observed frequency, count."""
    p, t = probs.flatten().numpy(), y.flatten().numpy()
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_p = np.bincount(which, weights=p, minlength=bins) / np.maximum(count, 1)
    freq = np.bincount(which, weights=t, minlength=bins) / np.maximum(count, 1)
    keep = count > 0
    return mean_p[keep], freq[keep], count[keep]


@dataclass
class RunResult:
    method: str
    seed: int
    threshold: float
    metrics: dict[str, float]
    test_scores: Tensor


def compare_methods(
    train: Split,
    val: Split,
    test: Split,
    seeds: list[int],
    cfg: MultilabelTrainConfig,
    methods: list[Method] | None = None,
    on_epoch: Callable[[], None] | None = None,
) -> list[RunResult]:
    """Train every method (same MLP, same budget) for every seed; score on ``test``."""
    methods = methods or METHODS
    results: list[RunResult] = []
    for seed in seeds:
        cache: dict[str, list[Tensor]] = {}
        for m in methods:
            key = m.family or m.name
            if key not in cache:
                cache[key] = train_scores(m, train, [val.x, test.x], cfg, seed, on_epoch)
            val_s, test_s = cache[key]
            threshold = m.threshold
            if threshold is None:
                threshold = tune_threshold(m.prob(val_s), val.y)
            metrics = scores_metrics(m.prob(test_s), test.y, threshold)
            results.append(RunResult(m.name, seed, threshold, metrics, test_s))
    return results


def trainings_needed(methods: list[Method] | None = None) -> int:
    return len({m.family or m.name for m in (methods or METHODS)})


def summarize(results: list[RunResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method and metric: (mean, standard deviation over seeds)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r.method for r in results):
        rows = [r for r in results if r.method == name]
        out[name] = {
            k: (
                float(np.mean([r.metrics[k] for r in rows])),
                float(np.std([r.metrics[k] for r in rows])),
            )
            for k in rows[0].metrics
        }
        out[name]["threshold"] = (
            float(np.mean([r.threshold for r in rows])),
            float(np.std([r.threshold for r in rows])),
        )
    return out


def sentinel_zlpr(scores: Tensor, target: Tensor) -> Tensor:
    """The common sentinel formulation of the hard ZLPR loss, ported to torch as is.

    Scores of the "wrong" group are pushed to ``-1e12`` and a zero column is concatenated
    before ``torch.logsumexp``; kept as the speed baseline (it overflows in float16).
    """
    signed = (1 - 2 * target) * scores
    neg = signed - target * 1e12
    pos = signed - (1 - target) * 1e12
    zeros = torch.zeros_like(signed[..., :1])
    neg_term = torch.logsumexp(torch.cat([neg, zeros], -1), -1)
    pos_term = torch.logsumexp(torch.cat([pos, zeros], -1), -1)
    return (neg_term + pos_term).mean()
