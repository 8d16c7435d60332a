"""kexue.diffusion.schedulers.DPMSolverV3Scheduler: DPM-Solver-v3 as a diffusers scheduler.

The equality checks run a hand-written diffusers loop (the model called at diffusers' 0-based
timestep, the scheduler's ``step`` after each call) against kexue's own sampler from the same
``x_T``: the scheduler applies the same plan with the same arithmetic, so only the way the
timestep reaches the U-Net (a 0-d tensor here, a batch of them in kexue) may differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from kexue.diffusion import (  # noqa: E402
    NoiseSchedule,
    SolverStatistics,
    estimate_solver_statistics,
    from_diffusers,
    sample,
)
from kexue.diffusion.dpm_solver_v3 import dpm_solver_v3_sample, v3_trajectory  # noqa: E402
from kexue.diffusion.schedulers import (  # noqa: E402
    DPMSolverV3Scheduler,
    noise_schedule_from_diffusers,
)
from kexue.testing.diffusion import tiny_diffusers_unet  # noqa: E402

T = 40
SHAPE = (3, 1, 8, 8)


@pytest.fixture(scope="module")
def setup():
    unet = tiny_diffusers_unet()
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.05)
    schedule = noise_schedule_from_diffusers(ddpm)
    data = torch.rand((12, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    statistics = estimate_solver_statistics(
        from_diffusers(unet), schedule, data, num_images=8, grid=6, method="finite-difference",
        generator=torch.Generator().manual_seed(2), progress=False,
    )  # fmt: skip
    assert float(statistics.s.abs().max()) > 0  # estimated, not the data-prediction special case
    return unet, ddpm, schedule, statistics


def run_loop(unet, scheduler: DPMSolverV3Scheduler, x_T: torch.Tensor) -> torch.Tensor:
    x = x_T * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, k), k).sample
            x = scheduler.step(eps, k, x).prev_sample
    return x


def test_loop_equals_kexue_sample(setup) -> None:
    unet, _, schedule, statistics = setup
    K = 5
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    scheduler.set_timesteps(K)
    evals, final = v3_trajectory(schedule, K)
    assert scheduler.timesteps.tolist() == [t - 1 for t in evals] and final == 0
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ours = run_loop(unet, scheduler, x_T)
    expected = sample(from_diffusers(unet), schedule, SHAPE, steps=K, solver="dpm-solver-v3",
                      statistics=statistics, x_T=x_T, progress=False)  # fmt: skip
    assert float(expected.abs().mean()) > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # a second trajectory restarts the multistep state at the first timestep
    torch.testing.assert_close(run_loop(unet, scheduler, x_T), ours, rtol=0, atol=0)


@pytest.mark.parametrize(
    "K, options",
    [
        (8, {"solver_order": 2, "spacing": "logsnr-uniform"}),
        (6, {"spacing": "time-uniform", "corrector_pseudo": True, "half_corrector": True}),
        (7, {"solver_order": 4, "pseudo_order": False, "lower_order_final": True}),
    ],
)
def test_loop_equals_the_solver_with_its_options(setup, K: int, options: dict) -> None:
    unet, _, schedule, statistics = setup
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics, schedule, **options)
    scheduler.set_timesteps(K)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    kw = {("order" if k == "solver_order" else k): v for k, v in options.items()}
    expected = dpm_solver_v3_sample(from_diffusers(unet), schedule, statistics, x_T, steps=K,
                                    progress=False, **kw)  # fmt: skip
    torch.testing.assert_close(run_loop(unet, scheduler, x_T), expected, rtol=1e-5, atol=1e-5)
    ks = scheduler.timesteps.tolist()
    final = v3_trajectory(schedule, K, options.get("spacing", "trailing"))[1]
    assert [scheduler.previous_timestep(k) for k in ks] == [*ks[1:], final - 1]


def test_explicit_timesteps(setup) -> None:
    unet, _, schedule, statistics = setup
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    kept = [3, 9, 20, 33, T]
    scheduler.set_timesteps(timesteps=[t - 1 for t in reversed(kept)])
    assert scheduler.timesteps.tolist() == [t - 1 for t in reversed(kept)]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    expected = dpm_solver_v3_sample(from_diffusers(unet), schedule, statistics, x_T,
                                    steps=kept, progress=False)  # fmt: skip
    torch.testing.assert_close(run_loop(unet, scheduler, x_T), expected, rtol=1e-5, atol=1e-5)


def test_ddpm_pipeline_runs_and_equals_kexue_sample(setup) -> None:
    unet, _, schedule, statistics = setup
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(3),
               output_type="np").images  # fmt: skip
    assert out.shape == (2, 8, 8, 1) and bool(((out >= 0) & (out <= 1)).all())
    x_T = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    ours = sample(from_diffusers(unet), schedule, (2, 1, 8, 8), steps=6, solver="dpm-solver-v3",
                  statistics=statistics, x_T=x_T, progress=False)  # fmt: skip
    expected = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out - expected).max() < 1e-5
    pil = pipe(batch_size=1, num_inference_steps=3).images
    assert pil[0].size == (8, 8)


def test_step_outputs(setup) -> None:
    unet, _, schedule, statistics = setup
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    scheduler.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    k = scheduler.timesteps[0]
    with torch.no_grad():
        eps = unet(x, k).sample
    out = scheduler.step(eps, k, x)
    t = int(k) + 1
    x0 = (x.double() - float(schedule.bbar[t]) * eps.double()) / float(schedule.abar[t])
    torch.testing.assert_close(out.pred_original_sample.double(), x0, rtol=1e-5, atol=1e-5)
    (prev,) = scheduler.step(eps, k, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample)
    # learned-variance models output 2C channels: the first C are eps
    doubled = scheduler.step(torch.cat([eps, eps * 0 + 7], 1), k, x).prev_sample
    assert torch.equal(doubled, out.prev_sample)


def test_add_noise_and_attributes(setup) -> None:
    _, ddpm, _, statistics = setup
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([0, 17, T - 1])
    torch.testing.assert_close(scheduler.add_noise(x0, noise, k), ddpm.add_noise(x0, noise, k),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert len(scheduler) == T and scheduler.order == 1 and scheduler.init_noise_sigma == 1.0
    assert scheduler.config.solver_order == 3
    # the schedule may be given as the pipeline's diffusers scheduler or its config
    for given in (ddpm, dict(ddpm.config)):
        again = DPMSolverV3Scheduler.from_statistics(statistics, given)
        assert again.config.schedule == scheduler.config.schedule
    with pytest.raises(ValueError, match="schedule"):
        DPMSolverV3Scheduler.from_statistics(statistics, diffusers.DDPMScheduler(T))
    with pytest.raises(TypeError, match="scheduler_or_config"):
        DPMSolverV3Scheduler.from_statistics(statistics, "ddpm")


def test_save_and_load_round_trip(setup, tmp_path: Path) -> None:
    unet, _, _, statistics = setup
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics, solver_order=2,
                                                     spacing="logsnr-uniform")  # fmt: skip
    scheduler.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "scheduler_config.json").is_file()
    assert (tmp_path / "s" / "statistics" / "statistics.safetensors").is_file()
    loaded = DPMSolverV3Scheduler.from_pretrained(tmp_path / "s")
    assert dict(loaded.config) == dict(scheduler.config)
    for name in ("steps", "l", "s", "b", "abar"):
        assert torch.equal(getattr(loaded.statistics, name), getattr(statistics, name))
    scheduler.set_timesteps(5)
    loaded.set_timesteps(5)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    assert torch.equal(run_loop(unet, loaded, x_T), run_loop(unet, scheduler, x_T))
    # a pipeline saves and reloads it as its scheduler folder
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    again = DPMSolverV3Scheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert dict(again.config) == dict(scheduler.config)
    with pytest.raises(ValueError, match="statistics"):
        DPMSolverV3Scheduler.from_pretrained(tmp_path / "pipe" / "unet")
    with pytest.raises(ValueError, match="no statistics"):
        DPMSolverV3Scheduler(num_train_timesteps=T).save_pretrained(tmp_path / "empty")


def test_bad_arguments_are_named(setup) -> None:
    _, _, schedule, statistics = setup
    with pytest.raises(TypeError, match="statistics"):
        DPMSolverV3Scheduler.from_statistics({"l": 1})
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverV3Scheduler.from_statistics(statistics, solver_order=5)
    with pytest.raises(ValueError, match="spacing"):
        DPMSolverV3Scheduler.from_statistics(statistics, spacing="even")
    with pytest.raises(TypeError, match="corrector"):
        DPMSolverV3Scheduler.from_statistics(statistics, corrector=1)
    with pytest.raises(ValueError, match="schedule"):
        DPMSolverV3Scheduler.from_statistics(statistics, NoiseSchedule.su_linear(T))
    other = SolverStatistics.data_prediction(schedule, (1, 4, 4))
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    with pytest.raises(ValueError, match="shape"):
        scheduler.attach_statistics(other)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 10, x)
    with pytest.raises(ValueError, match="no statistics"):
        DPMSolverV3Scheduler(num_train_timesteps=T).set_timesteps(4)
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(T + 1)
    with pytest.raises(ValueError, match="timesteps entries"):
        scheduler.set_timesteps(timesteps=[T])
    scheduler.set_timesteps(4)
    ks = scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match="timestep 5 is not"):
        scheduler.step(x, 5, x)
    with pytest.raises(ValueError, match="out of order"):
        scheduler.step(x, ks[2], x)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.zeros(1, 1, 4, 4), ks[0], x)
    with pytest.raises(ValueError, match="sample must hold"):
        scheduler.step(torch.zeros(2, 1, 4, 4), ks[0], torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(x, ks[0], x.long())
    scheduler.step(x, ks[0], x)
    with pytest.raises(ValueError, match="start again"):
        scheduler.step(x[:1], ks[1], x[:1])


def test_bfloat16_samples_against_float32(setup) -> None:
    """A bfloat16 U-Net: the scheduler keeps its multistep state in float32 and returns
    bfloat16. Stated tolerance: 5e-2 absolute on x_0 after 5 steps."""
    import copy

    unet, _, _, statistics = setup
    half = copy.deepcopy(unet).to(torch.bfloat16)
    scheduler = DPMSolverV3Scheduler.from_statistics(statistics)
    scheduler.set_timesteps(5)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    full = run_loop(unet, scheduler, x_T)
    low = run_loop(half, scheduler, x_T.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0, atol=5e-2)
