"""objective, run_setup, loop: the pieces of the shared run that can be checked without launching one."""

import pytest
import torch

from pu_diffusion.errors import InputError
from pu_diffusion.loop import check_finite
from pu_diffusion.objective import noise_band
from pu_diffusion.run_setup import plan_run
from pu_loss import RiskOutput


def test_a_non_finite_loss_stops_with_the_step_named():
    risk = RiskOutput(loss=torch.tensor(float("nan")), unlabeled_loss=torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="step 17"):
        check_finite(risk.to_log_dict(), 17, "out")
    check_finite(RiskOutput(loss=torch.tensor(2.0), unlabeled_loss=torch.tensor(2.0)).to_log_dict(), 18, "out")


def test_the_default_noise_band_is_timestep_100_of_the_linear_schedule_and_a_noise_level_elsewhere():
    """SNR <= 8.5 is t >= 100 under the linear 1,000-step schedule; under the cosine schedule the same
    noise level sits at a later timestep, and with 250 steps at an earlier one."""
    from diffusers import DDPMScheduler

    from tests.loss_flags import default_loss_flags

    flags = default_loss_flags()
    timesteps = torch.arange(1000)
    linear = noise_band(DDPMScheduler(num_train_timesteps=1000), timesteps, flags)
    assert torch.equal(linear, timesteps >= 100)
    cosine = noise_band(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), timesteps, flags)
    first_cosine = int(cosine.int().argmax())
    assert 150 < first_cosine < 250 and torch.equal(cosine, timesteps >= first_cosine)
    short = noise_band(DDPMScheduler(num_train_timesteps=250), torch.arange(250), flags)
    assert 0 < int(short.int().argmax()) < 100
    assert noise_band(None, timesteps, default_loss_flags(paper_loss=True)) is None


def test_a_noise_band_outside_the_schedule_is_refused():
    from diffusers import DDPMScheduler

    from pu_diffusion.objective import check_noise_band
    from tests.loss_flags import default_loss_flags

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(InputError, match="--sensitive_max_snr 1e-06: the noise schedule's lowest"):
        check_noise_band(scheduler, default_loss_flags(sensitive_max_snr=1e-6))
    with pytest.raises(InputError, match="--sensitive_min_timestep 1000"):
        check_noise_band(scheduler, default_loss_flags(sensitive_min_timestep=1000))
    check_noise_band(scheduler, default_loss_flags())  # the default band holds 900 timesteps


def test_the_plan_takes_the_estimated_prior_for_prior_auto():
    import argparse

    flags = argparse.Namespace(
        sensitive_batch_size=None, train_batch_size=4, learning_rate=1e-3, scale_lr=False,
        gradient_accumulation_steps=1, max_train_steps=None, num_train_epochs=2, prior="auto",
    )  # fmt: skip
    estimate = {"estimate": 0.07, "low": 0.05, "high": 0.09}
    plan = plan_run(flags, 0, range(40), range(8), 1, prior_estimate=estimate)
    assert plan.prior == 0.07 and plan.prior_estimate == estimate
    # S batch: 4 * 8 / 40 = 0.8, raised to the floor of 4
    assert (plan.sensitive_batch_size, plan.steps_per_epoch, plan.max_train_steps) == (4, 10, 20)
    flags.prior = 0.2
    assert plan_run(flags, 0, range(40), range(8), 1).prior == 0.2
