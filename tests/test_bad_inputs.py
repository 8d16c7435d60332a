"""Property-based bad-input sweep of kexue's public API (issue 10, section 2).

Every public function that takes tensors or numbers is called with one argument replaced by a
bad or unusual value (wrong dtype incl. int/bool/float16/float64, zero-size dims, NaN/inf,
mismatched shapes, the meta device, non-tensors, NumPy arrays and integers), on data that
hypothesis draws. Each outcome must be one of:

* a correct result: finite where the reference is, the right shape and dtype, and equal to a
  float64 reference (a formula written here, or the same call on the canonical float64 input
  for inputs that only change the representation);
* a ``ValueError`` / ``TypeError`` (``kexue.exceptions.NonFiniteError`` is a ``ValueError``)
  whose message names the argument.

Anything else is classified (:func:`run_case`) as an error that does not name the argument
(typically from deep inside torch), a silently wrong result, or a crash. Known failures of the
code under test are strict xfails (``KNOWN``): a fix turns them into XPASS, which fails, so the
entry is removed with the fix.

The cases are data (:data:`SPECS`, :func:`mutations`), and kexue is resolved lazily by name, so
the same catalogue can be run as plain calls against another version of the code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import re
import signal
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------------------------
# Resolution by name (so the catalogue does not import kexue at collection time)

#: ``{"losses.zlpr_loss": {"target": "targets"}}``: argument names of another version of kexue
#: (the counting script of the issue fills it for the code before the restructuring).
ARG_RENAMES: dict[str, dict[str, str]] = {}


#: ``{"ops.reduce_loss": "losses.reduction.reduce_loss"}``: where another version keeps a name.
NAME_RENAMES: dict[str, str] = {}


def resolve(path: str) -> Any:
    """``"losses.zlpr_loss"`` -> ``kexue.losses.zlpr_loss`` (attributes first, then
    submodules)."""
    first, *rest = NAME_RENAMES.get(path, path).split(".")
    obj: Any = importlib.import_module(f"kexue.{first}")
    for part in rest:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def arg_name(spec: str, name: str) -> str:
    return ARG_RENAMES.get(spec, {}).get(name, name)


def _renamed(spec: str, kw: dict[str, Any]) -> dict[str, Any]:
    return {arg_name(spec, k): v for k, v in kw.items()}


# --------------------------------------------------------------------------------------------
# Argument kinds and their bad values


@dataclasses.dataclass(frozen=True)
class Kind:
    """What an argument is, so the sweep knows its bad values.

    ``base``: ``float`` (floating tensor), ``image`` (floating images in [-1, 1]), ``points``
    (floating point cloud), ``index`` (integer class/neighbour indices), ``counts`` (integer
    k-occurrence counts), ``mask`` (bool tensor), ``int``, ``real``, ``gen``
    (``torch.Generator``), ``model`` (eps-model callable), ``dtype``, ``shape`` (a tuple).
    """

    base: str
    low: float | None = None  # int/real: smallest valid value
    optional: bool = False  # None is a valid value
    inf_ok: bool = False  # real: +inf is a valid value
    nan_ok: bool = False  # real: NaN is a valid value (a fill value)
    reshape: str | None = None  # tensor: "last"/"first" dim can mismatch another argument


FLOAT = Kind("float", reshape="last")
FLOAT1 = Kind("float")  # the only tensor argument: no shape to mismatch
TENSOR_BASES = {"float", "image", "points", "index", "counts", "mask"}

# mutation -> what a returned result must satisfy: "same" (equal to the reference on the
# canonical float64 input), "ref" (equal to the reference on the mutated input), "nonan"
# (any result without NaN, when no reference is known) or "error" (only an error is right)
VALID_LIKE = "same"


def mutations(kind: Kind) -> dict[str, str]:
    """The bad values of an argument kind, each with what a returned result must satisfy."""
    b = kind.base
    if b in ("float", "image", "points"):
        out = {
            "float64": "same",
            "float16": "same",
            "bfloat16": "same",
            "int64": "same",
            "bool": "same",
            "numpy": "same",
            "list": "same",
            "nan": "ref",
            "inf": "ref",
            "-inf": "ref",
            "meta": "error",
            "str": "error",
        }
        if b == "image":
            out["uint8_255"] = "error"
        if b == "points":
            out.update({"scale_1e19": "same", "scale_1e-30": "same"})
        if kind.reshape:
            out["shape"] = "error"
        if not kind.optional:
            out["none"] = "error"
        return out
    if b in ("index", "counts"):
        out = {
            "float32": "error" if b == "index" else "same",
            "int32": "same",
            "numpy": "same",
            "list": "same",
            "negative": "error",
            "meta": "error",
            "str": "error",
        }
        if b == "index" and kind.low is not None:
            out["out_of_range"] = "error"
        if b == "counts":
            out["nan"] = "error"
        if kind.reshape:
            out["shape"] = "error"
        return out
    if b == "mask":
        out = {"float32": "same", "int64": "same", "numpy": "same", "meta": "error", "str": "error"}
        if kind.reshape:
            out["shape"] = "error"
        return out
    if b == "int":
        out = {"np_int": "same", "float": "error", "bool": "error", "str": "error"}
        if kind.low is not None:
            out["below"] = "error"
        if not kind.optional:
            out["none"] = "error"
        return out
    if b == "real":
        out = {"np_float": "same", "nan": "any" if kind.nan_ok else "error", "str": "error"}
        out["inf"] = "nonan" if kind.inf_ok else "error"
        if kind.low is not None:
            out["below"] = "error"
        return out
    if b == "gen":
        return {"seed_int": "error", "str": "error"}
    if b == "model":
        return {"nan_model": "error", "wrong_shape_model": "error", "not_callable": "error"}
    if b == "dtype":
        return {"int64": "error", "bool": "error", "float64": "dtype", "str": "error"}
    if b == "shape":
        return {"negative": "error", "float": "error", "np_int": "same", "str": "error"}
    raise AssertionError(b)


def _nan_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    return torch.full_like(x, math.nan)


def _wrong_shape_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    return x[..., :1]


def mutate(value: Any, kind: Kind, mutation: str, rng: np.random.Generator) -> Any:
    """``value`` (a valid argument of ``kind``) turned into its ``mutation``."""
    if mutation == "str":
        return "bad"
    if mutation == "none":
        return None
    if kind.base in ("float", "image", "points", "index", "counts", "mask"):
        x = value
        if mutation in ("float64", "float16", "bfloat16", "float32", "int32"):
            return x.to(getattr(torch, mutation))
        if mutation == "int64":
            return x.round().long() if x.is_floating_point() else x.long()
        if mutation == "bool":
            return x > 0
        if mutation == "numpy":
            return x.numpy().copy()
        if mutation == "list":
            return x.tolist()
        if mutation == "meta":
            return x.to("meta")
        if mutation in ("nan", "inf", "-inf"):
            y = x.double().clone() if kind.base == "counts" else x.clone()
            if y.numel():
                y.view(-1)[int(rng.integers(y.numel()))] = float(mutation)
            return y
        if mutation == "uint8_255":
            return ((x + 1) * 127.5).round().to(torch.uint8)
        if mutation == "scale_1e19":
            return x * 1e19
        if mutation == "scale_1e-30":
            return x * 1e-30
        if mutation == "shape":
            if not x.ndim:
                return x.reshape(1, 1)
            return (
                torch.cat([x, x[:1]]) if kind.reshape == "first" else torch.cat([x, x[..., :1]], -1)
            )
        if mutation == "negative":
            y = x.clone()
            if y.numel():
                y.view(-1)[int(rng.integers(y.numel()))] = -2 if kind.base == "index" else -1
            return y
        if mutation == "out_of_range":
            y = x.clone()
            if y.numel():
                y.view(-1)[int(rng.integers(y.numel()))] = int(kind.low or 0) + 1000
            return y
    if kind.base == "int":
        return {
            "np_int": lambda: np.int64(value),
            "float": lambda: float(value),
            "bool": lambda: True,
            "below": lambda: int(kind.low or 0) - 1,
        }[mutation]()
    if kind.base == "real":
        return {
            "np_float": lambda: np.float64(value),
            "nan": lambda: math.nan,
            "inf": lambda: math.inf,
            "below": lambda: float(kind.low or 0) - 0.5,
        }[mutation]()
    if kind.base == "gen":
        return 0
    if kind.base == "model":
        return {"nan_model": _nan_model, "wrong_shape_model": _wrong_shape_model}.get(mutation, 1)
    if kind.base == "dtype":
        return {"int64": torch.int64, "bool": torch.bool, "float64": torch.float64}[mutation]
    if kind.base == "shape":
        if mutation == "negative":
            return (-1, *value[1:])
        if mutation == "float":
            return (float(value[0]), *value[1:])
        return tuple(np.int64(v) for v in value)
    raise AssertionError((kind, mutation))


def canonical64(value: Any, kind: Kind, mutation: str) -> Any:
    """The canonical float64 form of a representation-only mutation (the reference's input)."""
    if kind.base in ("float", "image", "points"):
        if mutation in ("numpy", "list"):
            value = torch.as_tensor(value)
        if isinstance(value, torch.Tensor):
            return value.double()
        return value
    if kind.base in ("index", "counts", "mask"):
        if isinstance(value, torch.Tensor) or mutation in ("numpy", "list"):
            t = torch.as_tensor(value)
            if kind.base == "mask":
                return t.bool()
            return t.long() if mutation != "float32" else t.round().long()
        return value
    if kind.base == "int" and mutation == "np_int":
        return int(value)
    if kind.base == "real" and mutation == "np_float":
        return float(value)
    if kind.base == "shape":
        return tuple(int(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# The catalogue


@dataclasses.dataclass(frozen=True)
class Spec:
    """One public function: how to build a valid call, which arguments to spoil, a reference.

    ``make(rng, n, c)`` returns canonical (float32) keyword arguments for sizes ``n`` (rows)
    and ``c`` (classes/features); ``call(kw)`` calls kexue; ``ref(kw)`` is a float64 reference
    on the same keywords (``None``: the same call on the canonical float64 input is the
    reference); ``out`` picks the tensors to compare; ``keeps_dtype``: the floating dtype of that
    argument is the result's; ``empty``: which sizes may be 0 (``n``, ``c``); ``random``: the
    result depends on random draws that change with the dtype (compare only shape/finiteness).
    """

    name: str
    make: Callable[[np.random.Generator, int, int], dict[str, Any]]
    slots: dict[str, Kind]
    call: Callable[[dict[str, Any]], Any] | None = None
    ref: Callable[[dict[str, Any]], Any] | None = None
    out: Callable[[Any], Any] = lambda r: r
    keeps_dtype: str | None = None
    empty: tuple[str, ...] = ("n", "c")
    random: bool = False
    since: str | None = None  # None: exists in every version swept; else "new"
    min_c: int = 2

    def invoke(self, kw: dict[str, Any]) -> Any:
        if self.call is not None:
            return self.call(kw)
        return resolve(self.name)(**_renamed(self.name, kw))


def _t(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * scale)


def _np64(x: Any) -> np.ndarray:
    return torch.as_tensor(x).double().numpy()


def _lse_np(a: np.ndarray, axis: int = -1) -> np.ndarray:
    from scipy.special import logsumexp as lse

    if a.shape[axis] == 0:
        return np.full(np.delete(a.shape, axis if axis >= 0 else a.ndim + axis), -np.inf)
    with np.errstate(all="ignore"):
        return np.asarray(lse(a, axis=axis))


def _ref_logsumexp(kw):
    x = _np64(kw["x"])
    if kw.get("mask") is not None:
        x = np.where(_np64(kw["mask"]) > 0, x, -np.inf)
    return torch.from_numpy(_lse_np(x))


def _ref_bounds(kw):
    x = _np64(kw["x"])
    if x.shape[-1] == 0:
        raise ValueError("x: empty")
    m = x.max(-1)
    return torch.from_numpy(m), torch.from_numpy(m + math.log(x.shape[-1]))


def _ref_smooth_max(kw):
    x, tau = _np64(kw["x"]), float(kw["tau"])
    return torch.from_numpy(tau * _lse_np(x / tau))


def _entropy_np(p: np.ndarray, order: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        if order == 1.0:
            return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), np.where(p < 0, p, 0)).sum(
                -1
            ) + np.where(np.isnan(p), np.nan, 0).sum(-1)
        if math.isinf(order):
            return -np.log(p.max(-1))
        return np.log((np.where(p > 0, p, 0.0) ** order).sum(-1)) / (1 - order)


def _ref_renyi(kw):
    return torch.from_numpy(np.asarray(_entropy_np(_np64(kw["p"]), float(kw["order"]))))


def _ref_lower_bound(kw):
    x, p = _np64(kw["x"]), _np64(kw["p"])
    with np.errstate(all="ignore"):
        w = np.where(p > 0, p * x, 0.0).sum(-1) + np.where(np.isnan(p * x), np.nan, 0).sum(-1)
    return torch.from_numpy(w + _entropy_np(p, float(kw["order"])))


def _probs(rng, n, c):
    p = rng.random((n, c)) + 0.1
    return torch.from_numpy((p / p.sum(-1, keepdims=True)).astype(np.float32))


def _zlpr_rows(s: np.ndarray, pos: np.ndarray) -> np.ndarray:
    # a -inf score marks a class that does not exist for the row (documented): no term at all
    with np.errstate(all="ignore"):
        exists = ~np.isneginf(s)
        neg = np.where(pos | ~exists, -np.inf, s)
        posv = np.where(pos & exists, -s, -np.inf)
        z = np.zeros((*s.shape[:-1], 1))
        return _lse_np(np.concatenate([z, neg], -1)) + _lse_np(np.concatenate([z, posv], -1))


def _mean(v: np.ndarray) -> torch.Tensor:
    return torch.tensor(v.mean() if v.size else math.nan, dtype=torch.float64)


def _ref_zlpr(kw):
    s, t = _np64(kw["scores"]), _np64(kw["target"])
    if np.isnan(t).any():
        return torch.tensor(math.nan)
    return _mean(_zlpr_rows(s, t > 0.5))


def _ref_sparse_zlpr(kw):
    s = _np64(kw["scores"])
    idx = torch.as_tensor(kw["target"]).long().numpy()
    pos = np.zeros(s.shape, dtype=bool)
    for row, ids in enumerate(idx):
        pos[row, ids[ids >= 0]] = True
    return _mean(_zlpr_rows(s, pos))


def _binary(rng, n, c):
    return torch.from_numpy((rng.random((n, c)) < 0.4).astype(np.float32))


def _positives(rng, n, c):
    k = min(2, c)
    out = np.stack([rng.permutation(c)[:k] for _ in range(n)]) if n else np.zeros((0, k))
    out = out.astype(np.int64).reshape(n, k)
    if n and k:
        out[0, -1] = -1  # ignore_index padding
    return torch.from_numpy(out)


def _softmax_ref(kw):
    mu = _np64(kw["mu"])
    if mu.shape[-1] == 0:
        raise ValueError("mu: empty")
    return torch.from_numpy(np.exp(mu - _lse_np(mu)[..., None]))


def _schedule(T: int = 20):
    return resolve("diffusion.NoiseSchedule").su_linear(T)


def _eps_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    return 0.1 * x


def _images(rng, n, c, quantise: bool = True):
    side = max(c, 1)
    x = torch.from_numpy(rng.uniform(-1, 1, (n, 1, side, side)).astype(np.float32))
    if quantise:
        x = torch.round((x + 1) * 127.5) / 127.5 - 1
    return x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_MOMENTS: dict[str, Any] = {}


def _moments():
    # one small estimate shared by the variance functions (their inputs are steps/K, not data)
    if "m" not in _MOMENTS:
        rng = np.random.default_rng(0)
        _MOMENTS["m"] = resolve("diffusion.estimate_moments")(
            _eps_model,
            _schedule(),
            _images(rng, 8, 3),
            num_images=8,
            batch_size=4,
            progress=False,
            generator=_gen(),
        )
    return _MOMENTS["m"]


def _dataclass_tensors(r: Any) -> list[Any]:
    return [
        v
        for f in dataclasses.fields(r)
        if isinstance(v := getattr(r, f.name), torch.Tensor | float) and not isinstance(v, bool)
    ]


def _points(rng, n, c):
    return _t(rng, max(n, 0), c)


def _brute_knn(X: np.ndarray, k: int) -> np.ndarray:
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def _ref_knn_indices(kw):
    X = _np64(kw["X"])
    scale = np.abs(X).max() if X.size else 1.0
    if not np.isfinite(X).all():
        raise ValueError("X: not finite")
    return torch.from_numpy(_brute_knn(X / (scale or 1.0), int(kw["k"])))


def _counts(rng, n, c):
    return torch.from_numpy(rng.integers(0, 2 * max(c, 1), n).astype(np.int64))


def _specs() -> list[Spec]:
    s: list[Spec] = []
    add = s.append
    # ---- ops
    add(
        Spec(
            "ops.logsumexp",
            lambda r, n, c: {"x": _t(r, n, c, scale=3.0)},
            {"x": FLOAT1},
            ref=_ref_logsumexp,
            keeps_dtype="x",
        )
    )
    add(
        Spec(
            "ops.logsumexp",
            lambda r, n, c: {"x": _t(r, n, c), "mask": torch.from_numpy(r.random((n, c)) < 0.7)},
            {"x": FLOAT, "mask": Kind("mask", reshape="last")},
            ref=_ref_logsumexp,
            keeps_dtype="x",
        )
    )
    add(
        Spec(
            "ops.logsumexp_bounds",
            lambda r, n, c: {"x": _t(r, n, c)},
            {"x": FLOAT1},
            ref=_ref_bounds,
            out=lambda b: (b.lower, b.upper),
            keeps_dtype="x",
        )
    )
    add(
        Spec(
            "ops.smooth_max",
            lambda r, n, c: {"x": _t(r, n, c), "tau": 0.5},
            {"x": FLOAT1, "tau": Kind("real", low=1e-9, optional=True)},
            ref=_ref_smooth_max,
            keeps_dtype="x",
        )
    )
    add(
        Spec(
            "ops.renyi_entropy",
            lambda r, n, c: {"p": _probs(r, n, c), "order": 2.0},
            {"p": FLOAT1, "order": Kind("real", low=0.0, inf_ok=True)},
            ref=_ref_renyi,
            keeps_dtype="p",
        )
    )
    add(
        Spec(
            "ops.logsumexp_lower_bound",
            lambda r, n, c: {"x": _t(r, n, c), "p": _probs(r, n, c), "order": 1.0},
            {"x": FLOAT, "p": FLOAT, "order": Kind("real", low=1.0, inf_ok=True)},
            ref=_ref_lower_bound,
            keeps_dtype="x",
        )
    )
    add(
        Spec(
            "ops.reduce_loss",
            lambda r, n, c: {"loss": _t(r, n), "reduction": "mean", "weight": _t(r, n)},
            {"loss": FLOAT, "weight": Kind("float", reshape="last", optional=True)},
            ref=lambda kw: _mean(_np64(kw["loss"]) * _np64(kw["weight"])),
            keeps_dtype="loss",
            empty=("n",),
        )
    )
    add(
        Spec(
            "ops.exp_flush_",
            lambda r, n, c: {"d": -_t(r, n, c).abs()},
            {"d": FLOAT1},
            call=lambda kw: resolve("ops.exp_flush_")(kw["d"]),
            ref=lambda kw: torch.from_numpy(np.exp(_np64(kw["d"]))),
            keeps_dtype="d",
            since="new",
        )
    )
    # ---- losses
    add(
        Spec(
            "losses.zlpr_loss",
            lambda r, n, c: {"scores": _t(r, n, c, scale=3.0), "target": _binary(r, n, c)},
            {"scores": FLOAT, "target": FLOAT},
            ref=_ref_zlpr,
            keeps_dtype="scores",
        )
    )
    add(
        Spec(
            "losses.zlpr_loss",
            lambda r, n, c: {
                "scores": _t(r, n, c),
                "target": _binary(r, n, c),
                "threshold": 0.0,
                "eps": 1e-7,
            },
            {"threshold": Kind("real"), "eps": Kind("real", low=0.0)},
            ref=_ref_zlpr,
        )
    )
    add(
        Spec(
            "losses.ZLPRLoss",
            lambda r, n, c: {"scores": _t(r, n, c, scale=3.0), "target": _binary(r, n, c)},
            {"scores": FLOAT, "target": FLOAT},
            call=lambda kw: resolve("losses.ZLPRLoss")()(kw["scores"], kw["target"]),
            ref=_ref_zlpr,
            keeps_dtype="scores",
        )
    )
    add(
        Spec(
            "losses.sparse_zlpr_loss",
            lambda r, n, c: {"scores": _t(r, n, c, scale=3.0), "target": _positives(r, n, c)},
            {"scores": Kind("float", reshape="first"), "target": Kind("index", low=0)},
            ref=_ref_sparse_zlpr,
            keeps_dtype="scores",
        )
    )
    add(
        Spec(
            "losses.zlpr_predict",
            lambda r, n, c: {"scores": _t(r, n, c), "threshold": 0.0},
            {"scores": FLOAT1, "threshold": Kind("real", inf_ok=True)},
            ref=lambda kw: torch.as_tensor(_np64(kw["scores"]) > float(kw["threshold"])),
        )
    )
    add(
        Spec(
            "losses.zlpr_probabilities",
            lambda r, n, c: {"scores": _t(r, n, c)},
            {"scores": FLOAT1},
            ref=lambda kw: torch.from_numpy(1 / (1 + np.exp(-2 * _np64(kw["scores"])))),
            keeps_dtype="scores",
        )
    )
    add(
        Spec(
            "losses.label_smoothing",
            lambda r, n, c: {"target": _binary(r, n, c), "alpha": 0.2},
            {"target": FLOAT1, "alpha": Kind("real", low=0.0)},
            ref=lambda kw: torch.from_numpy(
                (1 - kw["alpha"]) * _np64(kw["target"]) + kw["alpha"] / 2
            ),
            keeps_dtype="target",
        )
    )
    add(
        Spec(
            "losses.mixup",
            lambda r, n, c: {
                "x": _t(r, n, 3),
                "target": _binary(r, n, c),
                "alpha": 0.4,
                "generator": _gen(),
            },
            {
                "x": Kind("float", reshape="first"),
                "target": FLOAT1,
                "alpha": Kind("real", low=1e-9),
                "generator": Kind("gen", optional=True),
            },
            random=True,
            keeps_dtype="x",
        )
    )
    add(
        Spec(
            "losses.sample_beta",
            lambda r, n, c: {"a": 0.5, "b": 2.0, "size": max(n, 1), "generator": _gen()},
            {
                "a": Kind("real", low=1e-9),
                "b": Kind("real", low=1e-9),
                "size": Kind("int", low=0),
                "generator": Kind("gen", optional=True),
            },
            random=True,
            empty=(),
            since="new",
        )
    )
    # ---- distributions
    add(
        Spec(
            "distributions.perturbed_argmax_probs",
            lambda r, n, c: {"mu": _t(r, n, c), "noise": "gumbel"},
            {"mu": FLOAT1},
            ref=_softmax_ref,
            keeps_dtype="mu",
        )
    )
    add(
        Spec(
            "distributions.perturbed_argmax_probs",
            lambda r, n, c: {"mu": _t(r, n, c), "noise": "normal", "num_nodes": 16},
            {"mu": FLOAT1, "num_nodes": Kind("int", low=1, optional=True)},
            keeps_dtype="mu",
        )
    )
    add(
        Spec(
            "distributions.perturbed_argmax_log_probs",
            lambda r, n, c: {"mu": _t(r, n, c), "noise": "logistic", "num_nodes": 16},
            {"mu": FLOAT1},
            keeps_dtype="mu",
        )
    )
    add(
        Spec(
            "distributions.perturbed_argmax_cross_entropy",
            lambda r, n, c: {
                "mu": _t(r, n, c),
                "target": torch.from_numpy(r.integers(0, c, n)) if c else torch.zeros(n).long(),
                "noise": "gumbel",
            },
            {"mu": Kind("float", reshape="first"), "target": Kind("index", low=0, reshape="last")},
            ref=lambda kw: _mean(
                _lse_np(_np64(kw["mu"]))
                - np.take_along_axis(
                    _np64(kw["mu"]), torch.as_tensor(kw["target"]).long().numpy()[:, None], -1
                )[:, 0]
            ),
            keeps_dtype="mu",
        )
    )
    add(
        Spec(
            "distributions.PerturbedArgmax",
            lambda r, n, c: {"mu": _t(r, n, c), "noise": "gumbel"},
            {"mu": FLOAT1},
            call=lambda kw: resolve("distributions.PerturbedArgmax")(**kw).probs,
            ref=_softmax_ref,
            keeps_dtype="mu",
        )
    )
    add(
        Spec(
            "distributions.quadrature_rule",
            lambda r, n, c: {"rule": "gauss-legendre", "num_nodes": 8},
            {"num_nodes": Kind("int", low=1)},
            out=lambda q: (torch.as_tensor(q.u), torch.as_tensor(q.weights)),
            empty=(),
        )
    )
    add(
        Spec(
            "distributions.uniform",
            lambda r, n, c: {"width": 1.0},
            {"width": Kind("real", low=1e-9)},
            call=lambda kw: resolve("distributions.uniform")(**kw).cdf(torch.tensor([0.1, 2.0])),
            empty=(),
        )
    )
    # ---- diffusion
    add(
        Spec(
            "diffusion.sample",
            lambda r, n, c: {
                "eps_model": _eps_model,
                "schedule": _schedule(),
                "shape": (n, 1, max(c, 1), max(c, 1)),
                "steps": 4,
                "eta": 0.0,
                "x_T": _t(r, n, 1, max(c, 1), max(c, 1)),
                "progress": False,
            },
            {
                "x_T": Kind("float", reshape="last", optional=True),
                "steps": Kind("int", low=1, optional=True),
                "eta": Kind("real", low=0.0),
                "eps_model": Kind("model"),
                "shape": Kind("shape"),
            },
            keeps_dtype="x_T",
            empty=("n",),
        )
    )
    add(
        Spec(
            "diffusion.sample",
            lambda r, n, c: {
                "eps_model": _eps_model,
                "schedule": _schedule(),
                "shape": (max(n, 1), 1, 3, 3),
                "steps": 4,
                "generator": _gen(),
                "progress": False,
            },
            {"generator": Kind("gen", optional=True), "dtype": Kind("dtype")},
            random=True,
            empty=(),
        )
    )
    add(
        Spec(
            "diffusion.estimate_moments",
            lambda r, n, c: {
                "eps_model": _eps_model,
                "schedule": _schedule(),
                "data": _images(r, n + 1 if n else 0, c),  # at least 2 images, or none
                "num_images": n + 1 if n else 0,
                "batch_size": 4,
                "progress": False,
                "generator": _gen(),
            },
            {
                "data": Kind("image"),
                "num_images": Kind("int", low=1, optional=True),
                "batch_size": Kind("int", low=1),
                "eps_model": Kind("model"),
            },
            out=_dataclass_tensors,
            random=True,
            empty=("n",),
        )
    )
    add(
        Spec(
            "diffusion.nll_bpd",
            lambda r, n, c: {
                "eps_model": _eps_model,
                "schedule": _schedule(),
                "data": _images(r, n, c),
                "steps": 4,
                "bins": 256,
                "progress": False,
                "generator": _gen(),
            },
            {
                "data": Kind("image"),
                "steps": Kind("int", low=1, optional=True),
                "bins": Kind("int", low=2),
                "eps_model": Kind("model"),
            },
            out=lambda r: (r.bpd, r.bpd_per_image),
            random=True,
            empty=("n",),
        )
    )
    add(
        Spec(
            "diffusion.optimal_variance",
            lambda r, n, c: {"moments": _moments(), "schedule": _schedule(), "steps": 5},
            {"steps": Kind("int", low=1, optional=True), "eta": Kind("real", low=0.0)},
            empty=(),
        )
    )
    add(
        Spec(
            "diffusion.fixed_variance",
            lambda r, n, c: {"schedule": _schedule(), "steps": 5},
            {"steps": Kind("int", low=1, optional=True)},
            empty=(),
        )
    )
    add(
        Spec(
            "diffusion.resolve_steps",
            lambda r, n, c: {"schedule": _schedule(), "steps": 5},
            {"steps": Kind("int", low=1, optional=True)},
            out=lambda steps: torch.tensor(steps),
            empty=(),
        )
    )
    add(
        Spec(
            "diffusion.optimal_trajectory",
            lambda r, n, c: {"moments": _moments(), "schedule": _schedule(), "K": 4},
            {"K": Kind("int", low=1)},
            out=lambda steps: torch.tensor(steps),
            empty=(),
        )
    )
    add(
        Spec(
            "diffusion.NoiseSchedule.add_noise",
            lambda r, n, c: {"x0": _t(r, n, c), "eps": _t(r, n, c), "t": 5},
            {"x0": FLOAT, "eps": FLOAT, "t": Kind("int", low=0)},
            call=lambda kw: _schedule().add_noise(**kw),
            keeps_dtype="x0",
            since="new",
        )
    )
    add(
        Spec(
            "diffusion.frechet_distance",
            lambda r, n, c: {"a": _t(r, n + 4, c), "b": _t(r, n + 4, c)},
            {"a": FLOAT, "b": FLOAT},
            out=lambda d: torch.tensor(d),
            since="new",
            empty=("c",),
        )
    )
    add(
        Spec(
            "diffusion.precision_recall",
            lambda r, n, c: {"real": _t(r, n + 5, c), "fake": _t(r, n + 5, c), "k": 3},
            {"real": FLOAT, "fake": FLOAT, "k": Kind("int", low=1)},
            out=lambda pr: torch.tensor(pr),
            since="new",
            empty=("c",),
        )
    )
    add(
        Spec(
            "diffusion.image_grid",
            lambda r, n, c: {"images": _images(r, n, c, quantise=False), "pad": 1},
            {"images": Kind("image"), "pad": Kind("int", low=0)},
            out=lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)),
            since="new",
        )
    )
    # ---- lst
    add(
        Spec(
            "lst.right_pad",
            lambda r, n, c: {"parts": [_t(r, 2, c), _t(r, 3, c)], "value": 0.0},
            {"value": Kind("real", inf_ok=True, nan_ok=True)},
            out=lambda pair: pair,
            since="new",
            empty=("c",),
        )
    )
    # ---- hubness
    add(
        Spec(
            "hubness.knn",
            lambda r, n, c: {"X": _points(r, n + 6, c), "k": 3},
            {"X": Kind("points"), "k": Kind("int", low=1)},
            out=lambda nb: nb.indices,
            ref=_ref_knn_indices,
        )
    )
    add(
        Spec(
            "hubness.knn",
            lambda r, n, c: {"X": _points(r, n + 6, c), "Y": _points(r, 4, c), "k": 3},
            {"Y": Kind("points", reshape="last", optional=True)},
            out=lambda nb: nb.indices,
        )
    )
    add(
        Spec(
            "hubness.k_occurrence",
            lambda r, n, c: {"X": _points(r, n + 6, c), "k": 3},
            {"X": Kind("points"), "k": Kind("int", low=1)},
        )
    )
    for name in ("k_skewness", "gini_index", "robin_hood_index", "antihub_occurrence"):
        add(
            Spec(
                f"hubness.{name}",
                lambda r, n, c: {"n_k": _counts(r, n + 3, c)},
                {"n_k": Kind("counts")},
                out=lambda v: torch.tensor(v),
                empty=("n",),
            )
        )
    add(
        Spec(
            "hubness.atkinson_index",
            lambda r, n, c: {"n_k": _counts(r, n + 3, c), "eps": 0.5},
            {"n_k": Kind("counts"), "eps": Kind("real", low=0.0)},
            out=lambda v: torch.tensor(v),
            empty=("n",),
        )
    )
    add(
        Spec(
            "hubness.hub_occurrence",
            lambda r, n, c: {"n_k": _counts(r, n + 3, c), "k": 3},
            {"n_k": Kind("counts"), "k": Kind("int", low=1)},
            out=lambda v: torch.tensor(v),
            empty=("n",),
        )
    )
    add(
        Spec(
            "hubness.hubness_scores",
            lambda r, n, c: {"n_k": _counts(r, n + 3, c), "k": 3, "hub_size": 2.0},
            {"n_k": Kind("counts"), "k": Kind("int", low=1), "hub_size": Kind("real", low=0.0)},
            out=lambda h: torch.tensor([float(v) for v in dataclasses.astuple(h)]),
            empty=("n",),
        )
    )
    add(
        Spec(
            "hubness.hub_mask",
            lambda r, n, c: {"n_k": _counts(r, n + 3, c), "k": 3},
            {"n_k": Kind("counts"), "k": Kind("int", low=1)},
            empty=("n",),
        )
    )
    add(
        Spec(
            "hubness.occurrence_counts",
            lambda r, n, c: {
                "indices": torch.from_numpy(r.integers(0, 6, (n + 2, 3))),
                "n_points": 6,
            },
            {"indices": Kind("index", low=6), "n_points": Kind("int", low=1)},
            empty=(),
        )
    )
    add(
        Spec(
            "hubness.neighbor_recall",
            lambda r, n, c: {
                "found": torch.from_numpy(r.integers(0, 9, (n + 2, 3))),
                "exact": torch.from_numpy(r.integers(0, 9, (n + 2, 3))),
            },
            {"found": Kind("index", reshape="last"), "exact": Kind("index")},
            out=lambda v: torch.tensor(v),
            empty=(),
        )
    )
    add(
        Spec(
            "hubness.truncated_normal_latents",
            lambda r, n, c: {"n": n, "psi": 0.7, "latent_dim": 3, "generator": _gen()},
            {
                "n": Kind("int", low=0),
                "psi": Kind("real", low=1e-9, inf_ok=True),
                "latent_dim": Kind("int", low=1),
                "generator": Kind("gen", optional=True),
                "dtype": Kind("dtype"),
            },
            random=True,
            empty=("n",),
        )
    )
    add(
        Spec(
            "hubness.HubPriorSampler",
            lambda r, n, c: {
                "latent_dim": 3,
                "k": 3,
                "threshold": 4,
                "pool_size": 40,
                "generator": _gen(),
                "progress": False,
            },
            {
                "latent_dim": Kind("int", low=1),
                "k": Kind("int", low=1),
                "threshold": Kind("int", low=0),
                "pool_size": Kind("int", low=2),
                "dtype": Kind("dtype"),
                "generator": Kind("gen", optional=True),
            },
            call=lambda kw: resolve("hubness.HubPriorSampler")(**kw).sample(5),
            random=True,
            empty=(),
        )
    )
    add(
        Spec(
            "hubness.Hubness",
            lambda r, n, c: {"X": _points(r, n + 6, c), "k": 3},
            {"X": Kind("points"), "k": Kind("int", low=1)},
            call=lambda kw: resolve("hubness.Hubness")(k=kw["k"]).fit(kw["X"]).score(),
            out=lambda v: torch.tensor(v),
        )
    )
    return s


SPECS = _specs()

# --------------------------------------------------------------------------------------------
# Running one case and judging its outcome

CORRECT, CLEAN, UNNAMED, WRONG, CRASH = "correct", "clean error", "unnamed error", "wrong", "crash"


@dataclasses.dataclass
class Outcome:
    category: str
    detail: str


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, float | int | np.floating | np.integer | np.ndarray):
        return [torch.as_tensor(np.asarray(value))]
    return []


def _names_argument(message: str, names: list[str]) -> bool:
    return any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names
    )


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


@functools.cache
def _warm_up() -> None:
    # torch registers its meta kernels (and imports sympy) on the first meta operation: done
    # here, outside the timer, so a timeout never interrupts an import half-way
    x = torch.zeros(2, 3, device="meta")
    for op in (lambda: x.sum(-1), lambda: x.exp_(), lambda: x.amax(-1), lambda: x > 0):
        op()
    with contextlib.suppress(Exception):
        x.sum().item()
    # and the lazy imports of the code under test (scikit-learn's NotFittedError, scipy)
    for module in ("scipy.linalg", "scipy.special", "scipy.stats", "sklearn.exceptions"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    with contextlib.suppress(Exception):
        _ = importlib.import_module("kexue.exceptions").NotFittedError


def _call(
    spec: Spec, kw: dict[str, Any], timeout: float = 30.0
) -> tuple[Any, BaseException | None]:
    _warm_up()
    resolve(spec.name)  # imports outside the timer
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return spec.invoke(kw), None
    except _Timeout as e:
        return None, e
    except Exception as e:  # classified by the caller
        return None, e
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _compare(got: Any, want: Any, *, loose: bool, equal_nan: bool = True) -> str | None:
    g, w = _tensors(got), _tensors(want)
    if len(g) != len(w):
        return f"{len(g)} outputs, reference has {len(w)}"
    for a, b in zip(g, w, strict=True):
        if a.device.type == "meta":
            return "result on the meta device"
        if tuple(a.shape) != tuple(b.shape):
            return f"shape {tuple(a.shape)}, reference {tuple(b.shape)}"
        a64, b64 = a.detach().double(), b.detach().double()
        tol = dict(rtol=3e-2, atol=3e-2) if loose else dict(rtol=1e-4, atol=1e-5)
        if not torch.allclose(a64, b64, equal_nan=equal_nan, **tol):
            both = torch.isfinite(a64) & torch.isfinite(b64)
            if (torch.isnan(a64) != torch.isnan(b64)).any():
                return f"NaN where the reference has {b64.flatten()[:6].tolist()}"
            if not both.all() and (a64[~both] != b64[~both]).any():
                got_, want_ = a64.flatten()[:6].tolist(), b64.flatten()[:6].tolist()
                return f"non-finite mismatch: {got_} vs {want_}"
            return f"values differ: {a64.flatten()[:4].tolist()} vs {b64.flatten()[:4].tolist()}"
    return None


def _no_nan(got: Any) -> str | None:
    for a in _tensors(got):
        if a.device.type == "meta":
            return "result on the meta device"
        if a.is_floating_point() and bool(torch.isnan(a.detach()).any()):
            return "NaN in the result"
    return None


def run_case(
    spec: Spec, slot: str | None, mutation: str, seed: int, n: int, c: int, timeout: float = 30.0
) -> Outcome:
    """Call ``spec`` with ``slot`` spoiled by ``mutation`` (or, with ``slot=None``, the size
    named by ``mutation`` = ``empty:n``/``empty:c`` set to 0) and classify the outcome."""
    rng = np.random.default_rng(seed)
    c = max(c, spec.min_c)
    if slot is None:
        size = mutation.split(":")[1]
        n, c = (0, c) if size == "n" else (n, 0)
        kw = spec.make(rng, n, c)
        names = [arg_name(spec.name, a) for a in kw] + ["dim"]
        expect, kind = ("ref" if spec.ref else "nonan"), None
    else:
        kind = spec.slots[slot]
        expect = mutations(kind)[mutation]
        kw = spec.make(rng, n, c)
        canonical = kw.get(slot)
        if canonical is None and kind.base == "dtype":
            canonical = torch.float32
        kw = {**kw, slot: mutate(canonical, kind, mutation, rng)}
        names = [arg_name(spec.name, slot)]
    ref_kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got, err = _call(spec, kw, timeout)
    if isinstance(err, _Timeout):
        return Outcome(CRASH, "timed out")
    if err is not None:
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        if isinstance(err, ValueError | TypeError) and _names_argument(str(err), names):
            return Outcome(CLEAN, msg)
        return Outcome(UNNAMED, msg)
    try:
        got = spec.out(got)
    except Exception as e:
        return Outcome(WRONG, f"unusable result ({type(e).__name__}: {e})")
    if expect == "error":
        return Outcome(WRONG, f"accepted: returned {_summary(got)}")
    if expect == "any":
        return Outcome(CORRECT, "")
    if expect == "dtype":  # a valid dtype: the result has it
        bad = [t.dtype for t in _tensors(got) if t.is_floating_point() and t.dtype != kw[slot]]
        return (
            Outcome(WRONG, f"dtype {bad[0]} requested {kw[slot]}") if bad else Outcome(CORRECT, "")
        )
    if expect == "nonan" or (expect == "ref" and spec.ref is None):
        problem = _no_nan(got)
        if expect == "ref" and problem is None and mutation == "nan":
            if all(bool(torch.isfinite(t).all()) for t in _tensors(got) if t.is_floating_point()):
                floats = [t for t in _tensors(got) if t.is_floating_point()]
                if floats:
                    problem = "finite result from a NaN input"
        elif expect == "ref" and mutation == "nan" and problem == "NaN in the result":
            problem = None
        return Outcome(WRONG, problem) if problem else Outcome(CORRECT, "")
    if spec.random:
        problem = _no_nan(got) or _dtype_problem(spec, kw, slot, mutation, got)
        return Outcome(WRONG, problem) if problem else Outcome(CORRECT, "")
    # "same" (reference on the canonical float64 input) or "ref" (reference on this input)
    if slot is not None and kind is not None:
        ref_kw[slot] = canonical64(ref_kw[slot], kind, mutation)
    for k, v in ref_kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta":
            ref_kw[k] = v.double()
    try:
        want = spec.ref(ref_kw) if spec.ref is not None else spec.out(spec.invoke(ref_kw))
    except Exception as e:  # the reference says this input has no answer
        return Outcome(WRONG, f"returned {_summary(got)}; reference: {type(e).__name__} {e}")
    loose = mutation in ("float16", "bfloat16")
    problem = _compare(got, want, loose=loose) or _dtype_problem(spec, kw, slot, mutation, got)
    return Outcome(WRONG, problem) if problem else Outcome(CORRECT, "")


def _dtype_problem(spec: Spec, kw: dict, slot: str | None, mutation: str, got: Any) -> str | None:
    """The first result keeps the floating dtype of the inputs (promoted when they differ)."""
    if spec.keeps_dtype is None or slot != spec.keeps_dtype:
        return None
    if mutation not in ("float64", "float16", "bfloat16"):
        return None
    floats = [v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    want = floats[0].dtype
    for v in floats[1:]:
        want = torch.promote_types(want, v.dtype)
    first = _tensors(got)[:1]
    if first and first[0].is_floating_point() and first[0].dtype not in (want, kw[slot].dtype):
        return f"{slot} in {mutation} gave a {first[0].dtype} result, expected {want}"
    return None


def _summary(got: Any) -> str:
    ts = _tensors(got)
    if not ts:
        return type(got).__name__
    t = ts[0]
    values = t.flatten()[:3].tolist() if t.device.type != "meta" else "meta"
    return f"{t.dtype} {tuple(t.shape)} {values}"


def enumerate_cases(specs: list[Spec] | None = None) -> list[tuple[Spec, str | None, str]]:
    """Every (spec, argument, mutation) of the catalogue, ``argument=None`` for empty sizes."""
    out = []
    for spec in specs or SPECS:
        for slot, kind in spec.slots.items():
            for mutation in mutations(kind):
                out.append((spec, slot, mutation))
        for size in spec.empty:
            out.append((spec, None, f"empty:{size}"))
    return out


def case_id(spec: Spec, slot: str | None, mutation: str) -> str:
    index = [s.name for s in SPECS[: SPECS.index(spec)]].count(spec.name)
    name = spec.name if index == 0 else f"{spec.name}#{index}"
    return f"{name}-{slot or 'sizes'}-{mutation}"


# --------------------------------------------------------------------------------------------
# Known failures of the code under test (strict: a fix makes the test XPASS, which fails)

KNOWN: dict[str, str] = {
    "distributions.perturbed_argmax_log_probs-mu-bfloat16": (
        "wrong: bfloat16 mu gives log-probs 0.1 off the float64 reference of the same inputs"
    ),
    "hubness.Hubness-X-meta": "unnamed error: RuntimeError: Tensor.item() on meta tensors",
    "ops.logsumexp-x-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on meta t",
    "ops.logsumexp_bounds-x-meta": "wrong: accepted: returned torch.float32 (2,) meta",
    "ops.smooth_max-x-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on meta ",
    "ops.renyi_entropy-p-meta": "wrong: accepted: returned torch.float32 (2,) meta",
    "ops.logsumexp_lower_bound-x-shape": "unnamed error: RuntimeError: The size of tensor a (3) mu",
    "ops.reduce_loss-loss-numpy": "unnamed error: TypeError: unsupported operand type(s) for *: 'n",
    "ops.reduce_loss-loss-list": "unnamed error: TypeError: only integer tensors of a single eleme",
    "ops.reduce_loss-loss-meta": "unnamed error: RuntimeError: Tensor on device cpu is not on the ",
    "ops.reduce_loss-loss-str": "unnamed error: TypeError: only integer tensors of a single elemen",
    "ops.reduce_loss-loss-shape": "unnamed error: RuntimeError: The size of tensor a (3) must matc",
    "ops.reduce_loss-loss-none": "unnamed error: TypeError: unsupported operand type(s) for *: 'No",
    "ops.reduce_loss-weight-list": "unnamed error: TypeError: only integer tensors of a single ele",
    "ops.reduce_loss-weight-meta": "unnamed error: RuntimeError: Tensor on device meta is not on t",
    "ops.reduce_loss-weight-str": "unnamed error: TypeError: only integer tensors of a single elem",
    "ops.reduce_loss-weight-shape": "unnamed error: RuntimeError: The size of tensor a (2) must ma",
    "ops.exp_flush_-d-int64": "unnamed error: RuntimeError: result type Float can't be cast to the",
    "ops.exp_flush_-d-bool": "unnamed error: RuntimeError: result type Float can't be cast to the ",
    "ops.exp_flush_-d-numpy": "unnamed error: AttributeError: 'numpy.ndarray' object has no attrib",
    "ops.exp_flush_-d-list": "unnamed error: AttributeError: 'list' object has no attribute 'dtype",
    "ops.exp_flush_-d-meta": "wrong: accepted: returned torch.float32 (2, 3) meta",
    "ops.exp_flush_-d-str": "unnamed error: AttributeError: 'str' object has no attribute 'dtype'",
    "ops.exp_flush_-d-none": "unnamed error: AttributeError: 'NoneType' object has no attribute 'd",
    "losses.sparse_zlpr_loss-scores-float16": "wrong: scores in float16 gave a torch.float32 resul",
    "losses.sparse_zlpr_loss-scores-bfloat16": "wrong: scores in bfloat16 gave a torch.float32 res",
    "losses.zlpr_predict-scores-meta": "wrong: accepted: returned torch.bool (2, 3) meta",
    "losses.zlpr_predict-threshold-nan": "wrong: accepted: returned torch.bool (2, 3) [False, Fals",
    "losses.zlpr_predict-threshold-str": "unnamed error: TypeError: '>' not supported between inst",
    "losses.zlpr_probabilities-scores-meta": "wrong: accepted: returned torch.float32 (2, 3) meta",
    "losses.label_smoothing-target-meta": "unnamed error: RuntimeError: Tensor.item() cannot be ca",
    "losses.sample_beta-a-inf": "hangs: timed out",
    "losses.sample_beta-b-inf": "hangs: timed out",
    "distributions.perturbed_argmax_probs-mu-meta": "unnamed error: RuntimeError: Tensor.item() ca",
    "distributions.perturbed_argmax_probs#1-mu-meta": "unnamed error: RuntimeError: Tensor.item() ",
    "distributions.perturbed_argmax_log_probs-mu-meta": "unnamed error: RuntimeError: Tensor.item(",
    "distributions.perturbed_argmax_cross_entropy-mu-meta": "unnamed error: RuntimeError: Tensor.i",
    "distributions.PerturbedArgmax-mu-meta": "unnamed error: RuntimeError: Tensor.item() cannot be",
    "distributions.PerturbedArgmax-sizes-empty:n": "unnamed error: RuntimeError: cannot reshape te",
    "diffusion.sample-x_T-nan": "unnamed error: NonFiniteError: eps_model returned NaN values at s",
    "diffusion.sample-x_T-inf": "unnamed error: NonFiniteError: eps_model returned infinite values",
    "diffusion.sample-x_T--inf": "unnamed error: NonFiniteError: eps_model returned infinite value",
    "diffusion.sample-x_T-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on m",
    "diffusion.sample-steps-below": "unnamed error: ValueError: K must be in 1..T=20, got 0",
    "diffusion.estimate_moments-data-meta": "unnamed error: RuntimeError: Tensor.item() cannot be ",
    "diffusion.nll_bpd-data-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on",
    "diffusion.nll_bpd-steps-below": "unnamed error: ValueError: K must be in 2..T=20 (a trajector",
    "diffusion.optimal_variance-steps-below": "unnamed error: ValueError: K must be in 2..T=20 (a ",
    "diffusion.fixed_variance-steps-below": "unnamed error: ValueError: K must be in 2..T=20 (a tr",
    "diffusion.resolve_steps-steps-below": "unnamed error: ValueError: K must be in 2..T=20 (a tra",
    "diffusion.NoiseSchedule.add_noise-x0-meta": "wrong: accepted: returned torch.float32 (2, 3) m",
    "diffusion.NoiseSchedule.add_noise-eps-meta": "unnamed error: NotImplementedError: Cannot copy",
    "diffusion.frechet_distance-a-numpy": "unnamed error: AttributeError: 'numpy.ndarray' object h",
    "diffusion.frechet_distance-a-list": "unnamed error: AttributeError: 'list' object has no attr",
    "diffusion.frechet_distance-a-inf": "unnamed error: _LinAlgError: linalg.eigh: The algorithm f",
    "diffusion.frechet_distance-a--inf": "unnamed error: _LinAlgError: linalg.eigh: The algorithm ",
    "diffusion.frechet_distance-a-meta": "unnamed error: NotImplementedError: aten::equal: attempt",
    "diffusion.frechet_distance-a-str": "unnamed error: AttributeError: 'str' object has no attrib",
    "diffusion.frechet_distance-a-shape": "unnamed error: ValueError: need two (N, D) feature sets",
    "diffusion.frechet_distance-a-none": "unnamed error: AttributeError: 'NoneType' object has no ",
    "diffusion.frechet_distance-b-numpy": "unnamed error: AttributeError: 'numpy.ndarray' object h",
    "diffusion.frechet_distance-b-list": "unnamed error: AttributeError: 'list' object has no attr",
    "diffusion.frechet_distance-b-nan": "unnamed error: _LinAlgError: linalg.eigh: The algorithm f",
    "diffusion.frechet_distance-b-inf": "unnamed error: _LinAlgError: linalg.eigh: The algorithm f",
    "diffusion.frechet_distance-b--inf": "unnamed error: _LinAlgError: linalg.eigh: The algorithm ",
    "diffusion.frechet_distance-b-meta": "unnamed error: NotImplementedError: aten::equal: attempt",
    "diffusion.frechet_distance-b-str": "unnamed error: AttributeError: 'str' object has no attrib",
    "diffusion.frechet_distance-b-shape": "unnamed error: ValueError: need two (N, D) feature sets",
    "diffusion.frechet_distance-b-none": "unnamed error: AttributeError: 'NoneType' object has no ",
    "diffusion.precision_recall-real-numpy": "unnamed error: AttributeError: 'numpy.ndarray' objec",
    "diffusion.precision_recall-real-list": "unnamed error: AttributeError: 'list' object has no a",
    "diffusion.precision_recall-real-nan": "wrong: finite result from a NaN input",
    "diffusion.precision_recall-real-meta": "unnamed error: RuntimeError: Tensor on device meta is",
    "diffusion.precision_recall-real-str": "unnamed error: ValueError: need more than k=3 samples ",
    "diffusion.precision_recall-real-shape": "unnamed error: RuntimeError: X1 and X2 must have the",
    "diffusion.precision_recall-real-none": "unnamed error: TypeError: object of type 'NoneType' h",
    "diffusion.precision_recall-fake-numpy": "unnamed error: AttributeError: 'numpy.ndarray' objec",
    "diffusion.precision_recall-fake-list": "unnamed error: AttributeError: 'list' object has no a",
    "diffusion.precision_recall-fake-nan": "wrong: finite result from a NaN input",
    "diffusion.precision_recall-fake-meta": "unnamed error: RuntimeError: Tensor on device cpu is ",
    "diffusion.precision_recall-fake-str": "unnamed error: ValueError: need more than k=3 samples ",
    "diffusion.precision_recall-fake-shape": "unnamed error: RuntimeError: X1 and X2 must have the",
    "diffusion.precision_recall-fake-none": "unnamed error: TypeError: object of type 'NoneType' h",
    "diffusion.precision_recall-k-bool": "wrong: accepted: returned torch.float32 (2,) [...]",
    "diffusion.precision_recall-k-str": "unnamed error: TypeError: '<=' not supported between inst",
    "diffusion.precision_recall-k-below": "wrong: accepted: returned torch.float32 (2,) [0.0, 0.0]",
    "diffusion.precision_recall-k-none": "unnamed error: TypeError: '<=' not supported between ins",
    "diffusion.image_grid-images-numpy": "unnamed error: AttributeError: 'numpy.ndarray' object ha",
    "diffusion.image_grid-images-list": "unnamed error: AttributeError: 'list' object has no attri",
    "diffusion.image_grid-images-nan": "wrong: finite result from a NaN input",
    "diffusion.image_grid-images-meta": "unnamed error: NotImplementedError: Cannot copy out of me",
    "diffusion.image_grid-images-str": "unnamed error: AttributeError: 'str' object has no attribu",
    "diffusion.image_grid-images-uint8_255": "wrong: accepted: returned torch.float64 (5, 9) [255.",
    "diffusion.image_grid-images-none": "unnamed error: AttributeError: 'NoneType' object has no a",
    "diffusion.image_grid-pad-float": "unnamed error: TypeError: 'float' object cannot be interpre",
    "diffusion.image_grid-pad-bool": "wrong: accepted: returned torch.float64 (5, 9) [255.0, 255.0",
    "diffusion.image_grid-pad-str": "unnamed error: TypeError: unsupported operand type(s) for +: ",
    "diffusion.image_grid-pad-below": "unnamed error: ValueError: could not broadcast input array ",
    "diffusion.image_grid-pad-none": "unnamed error: TypeError: unsupported operand type(s) for +:",
    "diffusion.image_grid-sizes-empty:n": "unnamed error: ZeroDivisionError: division by zero",
    "lst.right_pad-value-str": "unnamed error: TypeError: new_full(): argument 'fill_value' (posit",
    "hubness.knn-X-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on meta ten",
    "hubness.knn#1-Y-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on meta t",
    "hubness.k_occurrence-X-meta": "unnamed error: RuntimeError: Tensor.item() cannot be called on",
    "hubness.k_skewness-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of meta te",
    "hubness.gini_index-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of meta te",
    "hubness.robin_hood_index-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of m",
    "hubness.antihub_occurrence-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of",
    "hubness.atkinson_index-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of met",
    "hubness.hub_occurrence-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of met",
    "hubness.hubness_scores-n_k-meta": "unnamed error: NotImplementedError: Cannot copy out of met",
    "hubness.hubness_scores-n_k-str": "unnamed error: TypeError: can't convert np.ndarray of type ",
    "hubness.hub_mask-n_k-negative": "wrong: accepted: returned torch.bool (5,) [False, False, Fal",
    "hubness.hub_mask-n_k-meta": "wrong: accepted: returned torch.bool (5,) meta",
    "hubness.hub_mask-n_k-str": "unnamed error: TypeError: new(): invalid data type 'str'",
    "hubness.hub_mask-n_k-nan": "wrong: accepted: returned torch.bool (5,) [False, False, False]",
    "hubness.occurrence_counts-indices-negative": "wrong: accepted: returned torch.int64 (6,) [2, ",
    "hubness.occurrence_counts-indices-meta": "unnamed error: NotImplementedError: The register_me",
    "hubness.occurrence_counts-indices-str": "unnamed error: TypeError: new(): invalid data type '",
    "hubness.neighbor_recall-found-float32": "wrong: accepted: returned torch.float32 () [0.25]",
    "hubness.neighbor_recall-found-negative": "wrong: accepted: returned torch.float32 () [0.25]",
    "hubness.neighbor_recall-found-meta": "unnamed error: RuntimeError: Tensor on device meta is n",
    "hubness.neighbor_recall-found-shape": "wrong: accepted: returned torch.float32 () [0.25]",
    "hubness.neighbor_recall-exact-float32": "wrong: accepted: returned torch.float32 () [0.25]",
    "hubness.neighbor_recall-exact-negative": "wrong: accepted: returned torch.float32 () [0.25]",
    "hubness.neighbor_recall-exact-meta": "unnamed error: RuntimeError: Tensor on device cpu is no",
    "hubness.HubPriorSampler-threshold-float": "wrong: accepted: returned torch.float32 (5, 3) [..",
}


def _params(package: str) -> list[Any]:
    params = []
    for spec, slot, mutation in enumerate_cases():
        if spec.name.split(".")[0] != package:
            continue
        cid = case_id(spec, slot, mutation)
        marks = ()
        if cid in KNOWN:
            marks = (pytest.mark.xfail(strict=True, reason=KNOWN[cid]),)
        params.append(pytest.param(spec, slot, mutation, id=cid, marks=marks))
    return params


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sweep(package: str) -> Callable[..., None]:
    # one test function per subpackage: hypothesis chains the settings of every parametrized
    # case of one function, and a thousand cases overflow the recursion limit
    @pytest.mark.parametrize(("spec", "slot", "mutation"), _params(package))
    @settings(
        max_examples=2,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.generate,),  # no shrinking: the case id already says what failed
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(seed=st.integers(0, 2**16), n=st.integers(1, 4), c=st.integers(2, 5))
    def test(spec: Spec, slot: str | None, mutation: str, seed: int, n: int, c: int) -> None:
        # a known hang is cut short: it only has to show that it still hangs
        timeout = 0.5 if "hangs" in KNOWN.get(case_id(spec, slot, mutation), "") else 30.0
        outcome = run_case(spec, slot, mutation, seed, n, c, timeout)
        assert outcome.category in (CORRECT, CLEAN), f"{outcome.category}: {outcome.detail}"

    return test


test_ops_bad_input = _sweep("ops")
test_losses_bad_input = _sweep("losses")
test_distributions_bad_input = _sweep("distributions")
test_diffusion_bad_input = _sweep("diffusion")
test_lst_bad_input = _sweep("lst")
test_hubness_bad_input = _sweep("hubness")
