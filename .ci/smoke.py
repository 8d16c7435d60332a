"""Smoke test of an installed wheel: ``python smoke.py core|all`` (run outside the repo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FLAVOUR = sys.argv[1]
BIN = Path(sys.executable).parent
GROUPS = {"diffusion": "diffusion", "lst": "lst", "hubness": "hubness"}
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def python(code: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code])


import kexue  # noqa: E402

check(
    not str(Path(kexue.__file__)).startswith(str(Path(__file__).resolve().parents[1] / "src")),
    f"kexue is imported from the installed wheel ({kexue.__file__})",
)
out = run([str(BIN / "kexue"), "--help"])
check(out.returncode == 0 and all(g in out.stdout for g in [*GROUPS, "tour"]),
      "kexue --help exits 0 and lists every command group")  # fmt: skip
out = run([str(BIN / "kexue"), "--version"])
check(out.returncode == 0 and out.stdout.startswith("kexue "), "kexue --version")

core = python(
    "import torch; from kexue.ops import logsumexp; from kexue.losses import zlpr_loss;"
    "from kexue.distributions import perturbed_argmax_probs;"
    "s = torch.randn(4, 6); t = torch.rand(4, 6) > 0.5;"
    "assert torch.isfinite(zlpr_loss(s, t)); assert torch.isfinite(logsumexp(s)).all();"
    "p = perturbed_argmax_probs(s.double(), 'normal'); assert torch.allclose(p.sum(-1), "
    "torch.ones(4, dtype=torch.float64))"
)
check(core.returncode == 0, f"core capabilities run {core.stderr[-300:]}")
native = python(
    "import torch; from kexue.native import build_kernels, native_kernels;"
    "from kexue.losses import zlpr_loss; build_kernels();"
    "s = torch.randn(4, 40); t = torch.rand(4, 40);"
    "fast = zlpr_loss(s, t)\nwith native_kernels(False): eager = zlpr_loss(s, t)\n"
    "torch.testing.assert_close(fast, eager)"
)
check(native.returncode == 0, f"the native kernels build from the wheel {native.stderr[-300:]}")

if FLAVOUR == "core":
    uses = {
        "lst": "import kexue.lst",
        "diffusion": "from kexue.diffusion import UNet; UNet.from_pretrained('mnist5k')",
        "hubness": "import torch; from kexue.hubness import knn; knn(torch.randn(50, 4), k=3,"
        " backend='faiss')",
        "data": "from kexue.datasets import mnist5k; mnist5k()",
    }
    for extra, code in uses.items():
        # the error must be an ImportError (a subclass is fine) whose message is one line
        # naming the extra
        probe = "try:\n    " + code + "\nexcept ImportError as err:\n    print(str(err))\n"
        out = python(probe)
        lines, said = out.stdout.strip().splitlines(), out.stdout.strip()
        check(out.returncode == 0 and len(lines) == 1 and f"kexue[{extra}]" in lines[0],
              f"missing extra '{extra}' named on use: {said!r} {out.stderr[-300:]}")  # fmt: skip
    for group, extra in GROUPS.items():
        out = run([str(BIN / "kexue"), group, "--help"])
        lines = out.stderr.strip().splitlines()
        check(out.returncode == 2 and len(lines) == 1 and f"kexue[{extra}]" in lines[0],
              f"kexue {group} --help exits 2 naming the extra: {out.stderr.strip()!r}")  # fmt: skip
else:
    for group in GROUPS:
        out = run([str(BIN / "kexue"), group, "--help"])
        check(out.returncode == 0, f"kexue {group} --help exits 0")
    out = python(
        "import torch; from kexue.diffusion import UNet, sample;"
        "model = UNet.from_pretrained('mnist5k');"
        "x = sample(model, model.schedule, (2, 1, 28, 28), steps=3, eta=0.0, progress=False,"
        " generator=torch.Generator().manual_seed(0));"
        "assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all(); print(float(x.std()))"
    )
    check(out.returncode == 0, f"a tiny sample from the shipped model {out.stderr[-500:]}")
    out = python("import kexue.lst, kexue.hubness, kexue.tour; print('imports ok')")
    check(out.returncode == 0, f"all subpackages import {out.stderr[-300:]}")

if failures:
    sys.exit(f"{len(failures)} smoke check(s) failed ({FLAVOUR})")
print(f"smoke checks passed ({FLAVOUR})")
