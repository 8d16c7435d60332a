"""kexue.native's switches: KEXUE_NATIVE, native_kernels(), and the fallback with one logged
line when the kernels cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

import kexue.native as native
from kexue.distributions import perturbed_argmax_cross_entropy
from kexue.exceptions import NativeKernelError
from kexue.losses import zlpr_loss


def test_the_environment_switches_the_kernel(kernel, monkeypatch) -> None:
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert native.kernels() is None
    with native.native_kernels(True):  # the explicit switch wins
        assert native.kernels() is kernel
    monkeypatch.setenv(native.ENV_VAR, "auto")
    assert native.kernels() is kernel
    monkeypatch.setenv(native.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="KEXUE_NATIVE must be one of auto, 0, 1"):
        native.kernels()


@pytest.fixture
def no_compiler(monkeypatch) -> None:
    """A machine where the build fails (no ninja), with no kernels loaded yet."""
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(native, "_is_built", lambda *args: False)


def test_a_failed_build_falls_back_with_one_line(no_compiler, monkeypatch, caplog) -> None:
    """No compiler: one logged line, then the eager paths of both losses; with
    KEXUE_NATIVE=1 an error naming the cause."""
    monkeypatch.setenv(native.ENV_VAR, "auto")
    gen = torch.Generator().manual_seed(4)
    mu = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    scores, labels = torch.randn(3, 6, generator=gen), torch.rand(3, 6, generator=gen)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        losses = [perturbed_argmax_cross_entropy(mu, target) for _ in range(2)]
        zlpr = zlpr_loss(scores, labels)
    failures = [r for r in caplog.records if "did not build" in r.getMessage()]
    assert len(failures) == 1 and "Ninja is required" in failures[0].getMessage()
    with native.native_kernels(False):
        torch.testing.assert_close(losses[0], perturbed_argmax_cross_entropy(mu, target))
        torch.testing.assert_close(zlpr, zlpr_loss(scores, labels))
    assert losses[1] == losses[0]
    monkeypatch.setenv(native.ENV_VAR, "1")
    with pytest.raises(NativeKernelError, match="Ninja is required"):
        zlpr_loss(scores, labels)


def test_the_command_builds_the_kernels(kernel, capsys) -> None:
    from kexue.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build-native"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"native kernels: {kernel.__file__}"


def test_the_command_fails_with_one_line(no_compiler, capsys) -> None:
    from kexue.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build-native"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1
    assert err[-1] == (
        "kexue: error: kexue's native kernels did not build: Ninja is required to load C++ "
        "extensions"
    )


def test_the_sleef_path_matches_the_mkl_path(kernel) -> None:
    """Where torch has no MKL, the kernels call SLEEF through ATen's vector type: built here
    with KEXUE_NO_MKL (about 30 s once per machine, then cached like the kernels), both
    losses agree with the MKL build to float32 rounding."""
    from torch.utils import cpp_extension

    flags = [*native._flags(), "-DKEXUE_NO_MKL"]
    sleef = cpp_extension.load(
        name=native._build_name("kexue_native_sleef", flags),
        sources=[str(p) for p in native.SOURCES],
        extra_cflags=flags,
    )
    gen = torch.Generator().manual_seed(6)
    mu = torch.randn(8, 37, generator=gen)
    mu -= mu.amax(-1, keepdim=True)
    y = torch.linspace(-6.0, 3.0, 24).expand(8, 24).contiguous()
    log_w = torch.full((8, 24), -3.0)
    target = torch.randint(37, (8,), generator=gen)
    for module_out, ref in zip(
        sleef.probit_cross_entropy(mu, y, log_w, target, True),
        kernel.probit_cross_entropy(mu, y, log_w, target, True),
        strict=True,
    ):
        torch.testing.assert_close(module_out, ref, rtol=1e-5, atol=1e-6)
    s, t = torch.randn(8, 37, generator=gen) * 3, torch.rand(8, 37, generator=gen)
    for module_out, ref in zip(
        sleef.zlpr(s, t, 0.0, 0.0, 1e20, 80.0, True),
        kernel.zlpr(s, t, 0.0, 0.0, 1e20, 80.0, True),
        strict=True,
    ):
        torch.testing.assert_close(module_out, ref, rtol=1e-6, atol=1e-7)
