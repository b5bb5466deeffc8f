"""The variance-exploding schedule and the EDM preconditioning."""

import math

import pytest
import torch

from diffem.schedule import EDMPreconditioning, VESchedule


def test_sigma_is_log_linear_between_bounds():
    schedule = VESchedule(sigma_min=1e-3, sigma_max=1e2)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    sigma = schedule.sigma(t)
    assert sigma[0].item() == pytest.approx(1e-3, rel=1e-12)
    assert sigma[2].item() == pytest.approx(1e2, rel=1e-12)
    assert sigma[1].item() == pytest.approx(math.sqrt(1e-3 * 1e2), rel=1e-12)


def test_discretize_decreases_and_ends_at_zero():
    levels = VESchedule().discretize(10)
    assert levels.shape == (11,)
    assert levels[-1].item() == 0.0
    assert torch.all(levels[1:] < levels[:-1])
    ratios = levels[1:-1] / levels[:-2]
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (1.0, 0.5), (1e-3, math.inf), (-1.0, 1.0)])
def test_bad_bounds_raise(bounds):
    with pytest.raises(ValueError, match="sigma_min"):
        VESchedule(*bounds)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        VESchedule().discretize(steps)


def test_training_levels_are_log_uniform():
    schedule = VESchedule(sigma_min=1e-2, sigma_max=1e2)
    generator = torch.Generator().manual_seed(0)
    log_sigma = schedule.sample_sigma(20_000, generator=generator).log10()
    # log10 sigma ~ U(-2, 2): mean 0, variance 16/12; 5 standard errors.
    assert abs(log_sigma.mean().item()) < 5 * math.sqrt(16 / 12 / 20_000)
    assert log_sigma.min() >= -2 and log_sigma.max() <= 2


def test_edm_preconditioning_identities():
    precond = EDMPreconditioning(sigma_data=0.5)
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    # The skip and output scalings give a unit-variance target for the network:
    # c_skip^2 sigma_d^2 + ... ; EDM eq. (7): c_out^2 = sigma^2 sigma_d^2 / (sigma^2 + sigma_d^2).
    torch.testing.assert_close(
        precond.c_skip(sigma) * (sigma**2 + 0.25), torch.full_like(sigma, 0.25)
    )
    torch.testing.assert_close(precond.c_in(sigma) ** 2 * (sigma**2 + 0.25), torch.ones_like(sigma))
    torch.testing.assert_close(
        precond.loss_weight(sigma) * precond.c_out(sigma) ** 2, torch.ones_like(sigma)
    )
    # For data of std sigma_d, x_t has std sqrt(sigma^2 + sigma_d^2): c_in normalises it.
    # The ideal denoiser of a N(0, sigma_d^2) prior is c_skip x_t (network output 0).
    x_t = torch.randn(5, dtype=torch.float64)
    tweedie = 0.25 / (0.25 + sigma[3] ** 2) * x_t
    torch.testing.assert_close(precond.c_skip(sigma[3]) * x_t, tweedie)
