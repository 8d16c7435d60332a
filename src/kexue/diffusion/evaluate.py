"""Offline sample-quality measures for digit generators (no Inception weights needed).

A small CNN trained on the 4,000 training digits of ``mnist5k`` supplies features (its
penultimate layer, 128-d) and class probabilities:

- **recognisability**: mean max-softmax confidence, the predicted-label histogram and its
  entropy (``log 10`` = every digit equally often);
- **Fréchet distance** of the features to the 1,000 held-out digits:
  ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``;
- k-NN **precision / recall** (Kynkäänniemi et al., 2019): the share of generated samples
  inside the real manifold (union of k-NN balls of real features), and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kexue.diffusion.unet import load_state_dict_strict
from kexue.distributed import assemble, shard
from kexue.exceptions import CheckpointError
from kexue.pretrained import PretrainedMixin
from kexue.progress import progress_bar
from kexue.validation import check_int, check_tensor

CLASSIFIER_ASSETS = Path(__file__).parent / "assets" / "classifiers"


class DigitClassifier(PretrainedMixin, nn.Module):
    """conv(32)-pool-conv(64)-pool-fc(128)-fc(10) on 28x28 images in [-1, 1].

    ``DigitClassifier.from_pretrained("mnist5k")`` is the shipped one (trained by
    :func:`train_digit_classifier` on mnist5k's 4,000 training digits); ``info`` records how.
    """

    pretrained_kind: ClassVar[str] = "kexue.diffusion.DigitClassifier"
    pretrained_version: ClassVar[int] = 1
    pretrained_extra: ClassVar[str] = "diffusion"
    pretrained_assets: ClassVar[Path | None] = CLASSIFIER_ASSETS

    def __init__(self, *, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.info: dict[str, Any] = dict(info or {})
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.out = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))

    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        return {"info": self.info}, {"model": self.state_dict()}

    @classmethod
    def from_pretrained_state(
        cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], **kwargs: Any
    ) -> DigitClassifier:
        if kwargs:
            raise TypeError(f"DigitClassifier.from_pretrained takes no options: {sorted(kwargs)}")
        if "model" not in tensors:
            raise CheckpointError("a saved DigitClassifier needs model.safetensors")
        model = cls(info=config.get("info", {}))
        load_state_dict_strict(model, tensors["model"], "the saved classifier weights")
        return model.eval().requires_grad_(False)


def train_digit_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``images`` ``(N, 1, 28, 28)`` in [-1, 1] with int
    ``labels`` in ``0..9`` (AdamW, one-cycle learning rate, light random shifts);
    deterministic for a given ``seed``."""
    images = check_tensor(images, "images", floating=True, ndim=4)
    labels = check_tensor(labels, "labels", ndim=1)
    if tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    if labels.is_floating_point() or len(labels) != len(images):
        raise ValueError(
            f"labels must be {len(images)} integer class indices, got {labels.dtype} of "
            f"shape {tuple(labels.shape)}"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError("labels must lie in 0..9 (num classes = 10)")
    epochs = check_int(epochs, "epochs", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1, high=len(images))
    seed = check_int(seed, "seed")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(images)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("training the digit classifier", total=steps)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                x = images[idx]
                shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
                x = torch.roll(x, shifts=shift, dims=(2, 3))
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.advance(task)
    return model.eval().requires_grad_(False)


def classifier_accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Share of ``images`` whose most probable class is ``labels``."""
    _, probs = classify(model, images)
    return float((probs.argmax(1) == labels.to(probs.device)).double().mean())


@torch.no_grad()
def classify(
    model: DigitClassifier, images: Tensor, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """Features (N, 128) and probabilities (N, 10) of images (N, 1, 28, 28) in [-1, 1].

    Under ``accelerate launch`` (an initialised ``torch.distributed`` group) the images are
    split over the processes and every process gets all N rows back (exact copies)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    batch_size = check_int(batch_size, "batch_size", low=1)
    mine = shard(torch.arange(len(images)))
    feats, probs = [torch.zeros(0, 128)], [torch.zeros(0, 10)]
    for chunk in images[mine.to(images.device)].float().split(batch_size):
        f = model.features(chunk.clamp(-1, 1))
        feats.append(f.cpu())
        probs.append(torch.softmax(model.out(f), -1).cpu())
    n = len(images)
    return assemble(torch.cat(feats), mine, n), assemble(torch.cat(probs), mine, n)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D).

    ``tr((S_a S_b)^{1/2})`` is the sum of square roots of the eigenvalues of the symmetric
    ``S_a^{1/2} S_b S_a^{1/2}`` (float64).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"need two (N, D) feature sets with N >= 2, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def _knn_radius(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall of ``fake`` against ``real`` features."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in both sets")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _knn_radius(real, k), _knn_radius(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (d.T <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)


@dataclass
class SampleQuality:
    frechet: float
    confidence: float
    label_entropy: float
    precision: float
    recall: float
    histogram: list[int]

    def as_dict(self) -> dict:
        return self.__dict__.copy()


class DigitEvaluator:
    """Scores generated 28x28 digits against the held-out mnist5k digits."""

    def __init__(self, reference: Tensor | None = None, classifier: DigitClassifier | None = None):
        from kexue.diffusion.data import load_images

        self.classifier = classifier or DigitClassifier.from_pretrained("mnist5k")
        if reference is None:
            reference = load_images("mnist5k").heldout
        self.reference_features, _ = classify(self.classifier, reference)

    def __call__(self, images: Tensor, k: int = 3) -> SampleQuality:
        feats, probs = classify(self.classifier, images)
        hist = torch.bincount(probs.argmax(1), minlength=10)
        share = hist.double() / hist.sum()
        entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
        precision, recall = precision_recall(self.reference_features, feats, k)
        return SampleQuality(
            frechet=frechet_distance(feats, self.reference_features),
            confidence=float(probs.max(1).values.mean()),
            label_entropy=entropy,
            precision=precision,
            recall=recall,
            histogram=hist.tolist(),
        )
