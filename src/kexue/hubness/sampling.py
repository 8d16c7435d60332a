"""Hub-prior latent sampling and the truncation-trick baseline, for any latent generator.

Procedure of ``docs/guides/hubness.md`` ("Hub-prior sampling"): draw a pool of ``pool_size``
candidates ``z ~ N(0, I)``, compute each candidate's hub value ``N_k`` within the pool, keep
those with ``N_k >= threshold``, and repeat rounds until ``n`` latents are kept; then
``x = G(z)``. Rejected candidates cost no generator call. The generator is any callable; this
module does not import one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kexue.hubness.knn import BACKENDS, METRICS
from kexue.hubness.measures import k_occurrence
from kexue.progress import progress_bar
from kexue.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_count,
    check_dtype,
    check_generator,
    check_real,
    check_shape,
)

__all__ = ["HubPriorSampler", "truncated_normal_latents"]


def truncated_normal_latents(
    n: int,
    psi: float,
    *,
    latent_dim: int | Sequence[int],
    method: str = "truncate",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` latents of the truncation trick, shape ``(n, *latent_dim)``.

    ``method="truncate"`` (BigGAN): every coordinate is an independent standard normal
    conditioned on ``|z_i| <= psi``, drawn exactly by the inverse CDF,
    ``z_i = Phi^{-1}(u)``, ``u ~ U(Phi(-psi), Phi(psi))``. ``method="scale"`` (StyleGAN's
    ``psi`` with a zero mean latent): ``z = psi * N(0, I)``. Smaller ``psi`` means latents
    closer to the mean: typically higher fidelity, less diversity. ``psi = inf`` with
    ``"truncate"`` is plain ``N(0, I)``.
    """
    n = check_count(n, "n")
    shape = check_shape(latent_dim, "latent_dim")
    method = check_choice(method, "method", ("truncate", "scale"))
    psi = check_real(psi, "psi", finite=False)
    if not psi > 0:
        raise ValueError(f"psi must be a positive number, got {psi!r}")
    check_generator(generator)
    dtype = check_dtype(dtype)
    if method == "scale":
        if math.isinf(psi):
            raise ValueError("psi must be finite with method='scale'")
        z = torch.randn((n, *shape), generator=generator, dtype=torch.float64, device=device)
        return (psi * z).to(dtype)
    if math.isinf(psi):
        return torch.randn((n, *shape), generator=generator, dtype=dtype, device=device)
    u = torch.rand((n, *shape), generator=generator, dtype=torch.float64, device=device)
    lo = torch.special.ndtr(torch.tensor(-float(psi), dtype=torch.float64))
    # symmetric: u in (lo, 1 - lo); 1 - 2 lo is computed without cancellation as erf
    width = math.erf(psi / math.sqrt(2.0))
    z = torch.special.ndtri(lo.to(u.device) + u * width)
    return z.clamp_(-psi, psi).to(dtype)


class HubPriorSampler:
    """Latents whose hub value within their candidate pool reaches ``threshold``.

    Each round draws ``pool_size`` candidates ``z ~ N(0, I)`` from ``generator``, computes
    ``N_k`` of every candidate within the pool (exact :func:`~kexue.hubness.knn`, self
    excluded unless ``exclude_self=False``) and keeps those with ``N_k >= threshold``
    (the article's snippet keeps ``N_k > t``: use ``threshold = t + 1``). At most
    ``k * pool_size / threshold`` candidates can pass per round (the counts sum to
    ``k * pool_size``), and none can when ``threshold > pool_size - 1``: that raises
    ``ValueError`` at once. Rounds run until ``n`` latents are kept, with a progress bar; if
    ``max_rounds`` rounds do not suffice, ``RuntimeError`` says how far it got.

    Args:
        latent_dim: size of one latent, an int or a shape such as ``(1, 28, 28)``; the hub
            value is computed on the flattened latents.
        k: neighbourhood size (article: 5).
        threshold: the least hub value kept (article: 50, 10x the mean ``k``).
        pool_size: candidates per round (article: 10,000). ``N_k`` depends on it.
        max_rounds: give up after this many rounds.
        metric, backend, chunk_size: passed to :func:`~kexue.hubness.knn`.
        exclude_self: ``False`` counts each candidate as its own neighbour (the GAN code's
            convention: counts are one higher, ``k`` includes the point itself).
        generator: the only source of randomness.
        progress: show a progress bar.

    Attributes (after ``sample``):
        hub_values_: ``N_k`` of the returned latents (int64, shape (n,)).
        rounds_: rounds drawn; candidates_seen_: ``rounds_ * pool_size``.
        acceptance_rate_: share of the candidates drawn that passed (including those of the
            last round beyond ``n``, which are not returned).
        latents_: the latents of the last :meth:`sample_from` call.
    """

    def __init__(
        self,
        latent_dim: int | Sequence[int],
        *,
        k: int = 5,
        threshold: int = 50,
        pool_size: int = 10_000,
        max_rounds: int = 1000,
        metric: str = "euclidean",
        exclude_self: bool = True,
        backend: str = "auto",
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.latent_shape = check_shape(latent_dim, "latent_dim")
        self.latent_dim = latent_dim
        self.k = check_count(k, "k")
        self.pool_size = check_count(pool_size, "pool_size")
        self.max_rounds = check_count(max_rounds, "max_rounds")
        if self.k >= self.pool_size:
            raise ValueError(f"k={k} must be < pool_size={pool_size}")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        exclude_self = check_bool(exclude_self, "exclude_self")
        most = self.pool_size - 1 if exclude_self else self.pool_size
        if not 0 <= threshold <= most:
            raise ValueError(
                f"threshold={threshold} can never be met: a hub value within a pool of "
                f"{self.pool_size} lies in [0, {most}]"
            )
        self.threshold = threshold
        self.metric = check_choice(metric, "metric", METRICS)
        self.exclude_self = exclude_self
        self.backend = check_choice(backend, "backend", BACKENDS)
        self.chunk_size = chunk_size
        self.generator = check_generator(generator)
        self.progress = check_bool(progress, "progress")
        # latents are N(0, I) draws: only floating dtypes make sense (torch.randn's own error
        # for int64 is a NotImplementedError from deep inside)
        self.dtype = check_dtype(dtype)
        self.device = device

    def __repr__(self) -> str:
        return (
            f"HubPriorSampler(latent_dim={self.latent_dim!r}, k={self.k}, "
            f"threshold={self.threshold}, pool_size={self.pool_size})"
        )

    def hub_values(self, pool: Tensor) -> Tensor:
        """``N_k`` of each latent of ``pool`` (n, *latent_shape) within the pool."""
        return k_occurrence(
            pool.flatten(1),
            self.k,
            metric=self.metric,
            exclude_self=self.exclude_self,
            backend=self.backend,
            chunk_size=self.chunk_size,
        )

    def sample(self, n: int) -> Tensor:
        """``n`` latents of shape ``(n, *latent_dim)`` with ``N_k >= threshold``."""
        n = check_count(n, "n")
        kept: list[Tensor] = []
        values: list[Tensor] = []
        total, rounds, passed = 0, 0, 0
        largest = -1
        label = f"hub-prior latents (k={self.k}, N_k >= {self.threshold})"
        with progress_bar(disable=not self.progress) as bar:
            task = bar.add_task(label, total=n)
            while total < n:
                if rounds >= self.max_rounds:
                    raise RuntimeError(
                        f"after {rounds} rounds of {self.pool_size:,} candidates only {total} "
                        f"of {n} latents reached N_k >= {self.threshold} (largest N_k seen: "
                        f"{largest}); lower threshold, or raise max_rounds"
                    )
                pool = torch.randn(
                    (self.pool_size, *self.latent_shape),
                    generator=self.generator,
                    dtype=self.dtype,
                    device=self.device,
                )
                counts = self.hub_values(pool)
                rounds += 1
                largest = max(largest, int(counts.max()))
                ok = counts >= self.threshold
                passed += int(ok.sum())
                take = min(int(ok.sum()), n - total)
                if take:
                    chosen = ok.nonzero().flatten()[:take]
                    kept.append(pool[chosen])
                    values.append(counts[chosen])
                    total += take
                    bar.advance(task, take)
        self.rounds_ = rounds
        self.candidates_seen_ = rounds * self.pool_size
        self.acceptance_rate_ = passed / self.candidates_seen_
        self.hub_values_ = torch.cat(values)
        return torch.cat(kept)

    def sample_from(
        self, generate_fn: Callable[[Tensor], Tensor], n: int, *, batch_size: int | None = None
    ) -> Tensor:
        """``generate_fn(z)`` for ``n`` hub-prior latents ``z``, in batches of ``batch_size``
        (default: all at once); the latents are kept in ``latents_``."""
        check_callable(generate_fn, "generate_fn", "generate_fn(latents) -> tensor")
        if batch_size is not None:
            batch_size = check_count(batch_size, "batch_size")
        z = self.sample(n)
        self.latents_ = z
        outputs = []
        for chunk in z.split(batch_size or n):
            out = generate_fn(chunk)
            if not isinstance(out, Tensor) or out.shape[0] != chunk.shape[0]:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"generate_fn must return a tensor with one row per latent "
                    f"({chunk.shape[0]}), got {got}"
                )
            outputs.append(out)
        return torch.cat(outputs)
