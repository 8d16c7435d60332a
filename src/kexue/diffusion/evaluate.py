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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASSET = Path(__file__).parent / "assets" / "classifier"


class DigitClassifier(nn.Module):
    """conv(32)-pool-conv(64)-pool-fc(128)-fc(10) on 28x28 images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
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


def train_classifier(
    images: Tensor, labels: Tensor, *, epochs: int = 8, seed: int = 0, batch_size: int = 64
) -> DigitClassifier:
    """Train the classifier (AdamW, light random shifts); deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(images)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
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
    return model.eval().requires_grad_(False)


def save_classifier(model: DigitClassifier, folder: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    from kexue.io import atomic_write, write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    atomic_write(folder / "classifier.safetensors", lambda tmp: save_file(state, tmp))
    write_json_atomic(folder / "config.json", info)


def load_classifier(folder: str | Path = ASSET) -> DigitClassifier:
    """The shipped classifier (trained once by ``train_classifier`` on mnist5k's train split)."""
    from safetensors.torch import load_file

    path = Path(folder) / "classifier.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no classifier at {path}; build it with train_classifier()")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(
    model: DigitClassifier, images: Tensor, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """Features (N, 128) and probabilities (N, 10) of images (N, 1, 28, 28) in [-1, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    feats, probs = [], []
    for chunk in images.float().split(batch_size):
        f = model.features(chunk.clamp(-1, 1))
        feats.append(f)
        probs.append(torch.softmax(model.out(f), -1))
    return torch.cat(feats), torch.cat(probs)


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

        self.classifier = classifier or load_classifier()
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
