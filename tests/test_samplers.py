"""Tests of diffem.samplers against exact Gaussian and Gaussian-mixture posteriors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from torch import Tensor

from diffem.operators import Dense, Mask, Operator
from diffem.priors import GaussianMixturePrior, GaussianPrior
from diffem.samplers import (
    DPS,
    MMPS,
    SMC,
    TMPD,
    PiGDM,
    Unconditional,
    conjugate_gradient,
)

D = 16
F64 = torch.float64


# ---------------------------------------------------------------------------- problems
def _gaussian_prior(seed: int = 0) -> GaussianPrior:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(D, D, generator=g, dtype=F64) / math.sqrt(D)
    cov = L @ L.T + 0.1 * torch.eye(D, dtype=F64)  # eigenvalues in [0.1, 3.1]
    mean = torch.randn(D, generator=g, dtype=F64)
    return GaussianPrior(mean, cov)


def _problem(prior: GaussianPrior, kind: str, n: int, seed: int = 1) -> tuple[Tensor, Operator]:
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(prior.sample(n, generator=seed), dtype=F64)
    if kind == "mask":
        op: Operator = Mask(torch.rand(n, D, generator=g) < 0.5, noise_std=0.1)
    else:
        A = torch.randn(n, 8, D, generator=g, dtype=F64) / math.sqrt(D)
        op = Dense(A, noise_std=0.1)
    op = op.to(dtype=F64)
    Y = op.apply(x) + 0.1 * torch.randn(n, op.n_measurements, generator=g, dtype=F64)
    if kind == "mask":
        Y = torch.where(op.observed, Y, torch.nan)  # pinned entries may be NaN
    return Y, op


def _exact_posterior(prior: GaussianPrior, Y: Tensor, op: Operator) -> tuple[Tensor, Tensor]:
    """Kalman form: mean ``(n, D)`` and covariance ``(n, D, D)`` of p(x | y_i)."""
    n = Y.shape[0]
    mean = prior.mean.to(F64)
    C = prior.cov_matrix.to(F64)
    A = op.matrix().expand(n, -1, -1)
    S = op.noise_var.expand(n, op.n_measurements)
    AC = A @ C
    K = torch.linalg.solve(AC @ A.mT + torch.diag_embed(S), AC).mT
    Yp = op.prepare(Y)
    m = mean + (K @ (Yp - A @ mean).unsqueeze(-1)).squeeze(-1)
    return m, C - K @ AC


def _whiten(x: Tensor, m: Tensor, P: Tensor) -> Tensor:
    L = torch.linalg.cholesky(P)
    return torch.linalg.solve_triangular(L, (x - m).unsqueeze(-1), upper=False).squeeze(-1)


def _moment_errors(z: Tensor) -> tuple[float, float]:
    """Max |z-score| of the mean and ``||S - I||_F`` of whitened samples ``z`` ``(n, D)``."""
    n = z.shape[0]
    zscore = z.mean(0).abs().max().item() * math.sqrt(n)
    S = z.T @ z / n
    return zscore, torch.linalg.norm(S - torch.eye(z.shape[1], dtype=z.dtype)).item()


def _frobenius_bound(n: int, d: int, reps: int = 300) -> float:
    """Bound on ``||S - I||_F`` for a sampler whose covariance bias adds at most half the
    sampling-noise level in quadrature: sqrt(1.25) times the 99.9% quantile of the statistic over
    exact N(0, I) samples of the same size."""
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(reps, n, d, generator=g, dtype=F64)
    S = z.mT @ z / n
    stats = torch.linalg.matrix_norm(S - torch.eye(d, dtype=F64))
    return math.sqrt(1.25) * torch.quantile(stats, 0.999).item()


Z_BOUND = 4.5  # Bonferroni over D = 16 coordinates: P(max |z| > 4.5) ~ 1e-4


# ---------------------------------------------------------------------------- conjugate gradient
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_cg_matches_solve_on_spd(m: int, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(batch, m, m, generator=g, dtype=F64)
    M = B @ B.mT + 0.5 * torch.eye(m, dtype=F64)
    b = torch.randn(batch, m, generator=g, dtype=F64)
    result = conjugate_gradient(
        lambda p: (M @ p.unsqueeze(-1)).squeeze(-1), b, max_iter=m, rtol=1e-12
    )
    expected = torch.linalg.solve(M, b)
    scale = expected.abs().max().item() + 1.0
    assert torch.allclose(result.solution, expected, atol=1e-6 * scale, rtol=1e-6)
    assert not result.safeguarded.any()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["indefinite", "singular", "zero", "nonsymmetric"]),
)
def test_cg_finite_on_bad_systems(m: int, batch: int, seed: int, kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(batch, m, m, generator=g, dtype=torch.float32)
    if kind == "indefinite":
        M = B + B.mT
    elif kind == "singular":
        M = B[..., :1] @ B[..., :1].mT
    elif kind == "zero":
        M = torch.zeros_like(B)
    else:
        M = B * 100
    b = torch.randn(batch, m, generator=g)
    b[0] = 0.0  # an exactly solved element: 0 / 0 in a textbook CG
    result = conjugate_gradient(lambda p: (M @ p.unsqueeze(-1)).squeeze(-1), b, max_iter=3 * m)
    assert torch.isfinite(result.solution).all()
    assert torch.isfinite(result.residual).all()
    assert (result.solution[0] == 0).all()


def test_cg_nonfinite_product_is_isolated() -> None:
    b = torch.ones(3, 4, dtype=F64)

    def matvec(p: Tensor) -> Tensor:
        out = 2.0 * p
        out[1] = torch.nan
        return out

    result = conjugate_gradient(matvec, b, max_iter=4)
    assert torch.isfinite(result.solution).all()
    assert torch.allclose(result.solution[[0, 2]], torch.full((2, 4), 0.5, dtype=F64))
    assert (result.solution[1] == 0).all()


def test_cg_remainder_and_image_follow_the_solution() -> None:
    # M = S + A Bm with an image Bm p: the returned residual vector is b - M u, the image is
    # Bm u, so that A (Bm u) = b - r - S u (what MMPS's residual guard uses).
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 5, 3, generator=g, dtype=F64)
    L = torch.randn(4, 3, 3, generator=g, dtype=F64)
    Bm = L @ L.mT @ A.mT  # (4, 3, 5)
    S = torch.rand(4, 5, generator=g, dtype=F64) + 0.1
    b = torch.randn(4, 5, generator=g, dtype=F64)

    def matvec(p: Tensor) -> tuple[Tensor, Tensor]:
        image = (Bm @ p.unsqueeze(-1)).squeeze(-1)
        return S * p + (A @ image.unsqueeze(-1)).squeeze(-1), image

    result = conjugate_gradient(matvec, b, max_iter=2, rtol=0.0)
    u = result.solution
    M_u = S * u + (A @ (Bm @ u.unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(result.remainder, b - M_u)
    torch.testing.assert_close(result.image, (Bm @ u.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(
        (A @ result.image.unsqueeze(-1)).squeeze(-1), b - result.remainder - S * u
    )


def test_posterior_samplers_draw_n_samples_chains() -> None:
    # n_samples independent chains per observation: the same draws as repeating the rows.
    prior = _gaussian_prior()
    Y, op = _problem(prior, "dense", 5)
    sampler = MMPS(steps=6, cg_iter=2)
    x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0), n_samples=3)
    rows = torch.arange(5).repeat_interleave(3)
    flat = sampler.sample(prior, Y[rows], op[rows], generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, D)
    torch.testing.assert_close(x.reshape(15, D), flat)
    assert not torch.equal(x[:, 0], x[:, 1])
    with pytest.raises(ValueError, match="n_samples"):
        sampler.sample(prior, Y, op, n_samples=0)


# ---------------------------------------------------------------------------- Gaussian ground truth
@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_mmps_matches_exact_gaussian_posterior(kind: str) -> None:
    # With exact CG (cg_iter >= M) and a Gaussian prior, MMPS's guided denoiser is exactly
    # E[x | x_t, y]; what remains is the time discretisation, small at 128 DDIM steps.
    n = 1000
    prior = _gaussian_prior()
    Y, op = _problem(prior, kind, n)
    m, P = _exact_posterior(prior, Y, op)
    # The exact posterior means agree with the prior's own implementation.
    assert np.allclose(prior.posterior_mean(Y, op), m.numpy(), atol=1e-4)
    sampler = MMPS(steps=128, cg_iter=16, eta=0.0)
    x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, D) and x.dtype == F64 and not x.requires_grad
    zscore, frob = _moment_errors(_whiten(x, m, P))
    assert zscore < Z_BOUND
    assert frob < _frobenius_bound(n, D), frob
    diag = sampler.diagnostics_
    assert diag["cg_residual"] < 1e-5
    assert diag["cg_safeguarded"] == 0.0 and diag["clipped"] == 0.0 and diag["fallback"] == 0.0
    assert diag["wall_time"] > 0


@pytest.mark.parametrize("kind", ["mask", "dense"])
@pytest.mark.parametrize(
    ("solver", "eta", "steps"),
    [("heun", 0.0, 32), ("heun", 1.0, 32), ("dpmpp_2m", 1.0, 32)],
)
def test_mmps_second_order_solvers_match_exact_posterior(
    kind: str, solver: str, eta: float, steps: int
) -> None:
    # Same bounds as the 128-step DDIM test above, with half the evaluations (Heun: 63,
    # DPM-Solver++(2M): 32); the ancestral solver fails them at 64 steps (table in
    # diffem.samplers.base.Sampler).
    n = 1000
    prior = _gaussian_prior()
    Y, op = _problem(prior, kind, n)
    m, P = _exact_posterior(prior, Y, op)
    sampler = MMPS(steps=steps, cg_iter=16, eta=eta, solver=solver)
    x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, D) and x.dtype == F64 and not x.requires_grad
    zscore, frob = _moment_errors(_whiten(x, m, P))
    assert zscore < Z_BOUND
    assert frob < _frobenius_bound(n, D), frob
    diag = sampler.diagnostics_
    assert diag["evaluations"] == (2 * steps - 1 if solver == "heun" else steps)
    assert diag["cg_safeguarded"] == 0.0 and diag["clipped"] == 0.0 and diag["fallback"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mask", "dense"])
@pytest.mark.parametrize(
    ("params", "factor"),
    [
        ({"steps": 512, "cg_iter": 16, "eta": 1.0}, 1.0),  # DDPM needs many steps
        ({}, 5.0),  # the defaults: 64 DDPM steps, one CG iteration
        ({"cg_iter": 3}, 5.0),
        ({"steps": 64, "cg_iter": 16, "solver": "heun", "eta": 0.0}, 1.0),
        ({"steps": 64, "cg_iter": 16, "solver": "dpmpp_2m", "eta": 0.0}, 1.0),
        # Three CG iterations leave a small bias on the dense problem (0.49 against 0.47).
        ({"steps": 32, "cg_iter": 3, "solver": "dpmpp_2m"}, 1.25),
    ],
)
def test_mmps_gaussian_posterior_settings(kind: str, params: dict, factor: float) -> None:
    n = 2000
    prior = _gaussian_prior()
    Y, op = _problem(prior, kind, n)
    m, P = _exact_posterior(prior, Y, op)
    x = MMPS(**params).sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
    zscore, frob = _moment_errors(_whiten(x, m, P))
    assert zscore < Z_BOUND
    # The defaults trade accuracy for speed: covariance error within a few noise levels.
    assert frob < factor * _frobenius_bound(n, D), frob


def test_mmps_mixture_mode_weights() -> None:
    d, n = 4, 800
    means = torch.tensor([[-2.0, -2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, -3.0]])
    prior = GaussianMixturePrior(
        torch.tensor([0.3, 0.5, 0.2], dtype=F64), means.to(F64), torch.full((3,), 0.25, dtype=F64)
    )
    g = torch.Generator().manual_seed(3)
    x = torch.as_tensor(prior.sample(n, generator=3), dtype=F64)
    # Observe one coordinate with large noise: the posteriors stay multimodal.
    mask = torch.zeros(n, d, dtype=torch.bool)
    mask[torch.arange(n), torch.randint(0, d, (n,), generator=g)] = True
    op = Mask(mask, noise_std=1.0).to(dtype=F64)
    Y = op.apply(x) + torch.randn(n, d, generator=g, dtype=F64)
    weights = torch.as_tensor(prior.posterior_weights(Y, op), dtype=F64)  # (n, K)
    samples = MMPS(steps=64, cg_iter=4).sample(
        prior, Y, op, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.cdist(samples, means.to(F64)).argmin(dim=-1)
    observed = torch.bincount(labels, minlength=3).to(F64) / n
    expected = weights.mean(dim=0)
    # Sampling std of a frequency is <= 0.5 / sqrt(n) ~ 0.018; allow 4.5 of them plus 0.03 of
    # approximation error (MMPS is not exact for mixtures).
    assert torch.allclose(observed, expected, atol=4.5 * 0.5 / math.sqrt(n) + 0.03), (
        observed,
        expected,
    )


@pytest.mark.parametrize(("eta", "steps"), [(1.0, 256), (0.0, 128)])
def test_unconditional_matches_prior(eta: float, steps: int) -> None:
    n = 2000
    prior = _gaussian_prior()
    sampler = Unconditional(steps=steps, eta=eta)
    x = sampler.sample(prior, n, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert x.shape == (n, D) and x.dtype == F64
    C = prior.cov_matrix.to(F64)
    m = prior.mean.to(F64).expand(n, -1)
    zscore, frob = _moment_errors(_whiten(x, m, C.expand(n, -1, -1)))
    assert zscore < Z_BOUND
    assert frob < _frobenius_bound(n, D), frob


@pytest.mark.parametrize(
    ("solver", "eta", "steps"),
    [("heun", 0.0, 48), ("heun", 1.0, 48), ("dpmpp_2m", 0.0, 32), ("dpmpp_2m", 1.0, 32)],
)
def test_unconditional_second_order_matches_prior(solver: str, eta: float, steps: int) -> None:
    # The bounds of the 256-step DDPM and 128-step DDIM tests above, at 95 (Heun) and 32
    # (DPM-Solver++(2M)) evaluations.
    n = 2000
    prior = _gaussian_prior()
    sampler = Unconditional(steps=steps, eta=eta, solver=solver)
    x = sampler.sample(prior, n, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert sampler.diagnostics_["evaluations"] == (2 * steps - 1 if solver == "heun" else steps)
    C = prior.cov_matrix.to(F64)
    zscore, frob = _moment_errors(_whiten(x, prior.mean.to(F64).expand(n, -1), C.expand(n, -1, -1)))
    assert zscore < Z_BOUND
    assert frob < _frobenius_bound(n, D), frob


def _variance_ratio(solver: str, steps: int, scale: float = 1.0) -> float:
    """Final variance over the true one for a deterministic solver on the 1-D prior
    N(0, scale^2): the map x_T -> x_0 is linear, so one sample gives it exactly."""
    prior = GaussianPrior(torch.zeros(1, dtype=F64), torch.full((1, 1), scale**2, dtype=F64))
    sampler = Unconditional(steps=steps, eta=0.0, solver=solver)
    x0 = sampler.sample(prior, 1, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    z = torch.randn((1, 1), generator=torch.Generator().manual_seed(0), dtype=F64)
    return (x0 / (sampler.sigma_max * z)).item() ** 2 * sampler.sigma_max**2 / scale**2


@pytest.mark.parametrize(
    ("solver", "expected"),
    [
        ("ancestral", [0.681, 0.830, 0.913, 0.956]),
        ("heun", [1.189, 1.038, 1.009, 1.002]),
        ("dpmpp_2m", [1.058, 1.016, 1.004, 1.001]),
    ],
)
def test_solver_order_on_1d_gaussian(solver: str, expected: list[float]) -> None:
    # Exact variance ratios at 16, 32, 64, 128 steps (the table of Sampler's docstring): the
    # error halves per doubling of the steps for the first-order DDIM step and drops about
    # fourfold for the second-order solvers.
    ratios = [_variance_ratio(solver, steps) for steps in (16, 32, 64, 128)]
    assert np.allclose(ratios, expected, atol=2e-3), ratios
    errors = np.abs(np.array(ratios) - 1.0)
    factor = errors[:-1] / errors[1:]
    if solver == "ancestral":
        assert np.all((factor > 1.6) & (factor < 2.5)), factor
    else:
        assert np.all(factor > 3.0), factor
    # Nearly independent of the prior's scale.
    assert abs(_variance_ratio(solver, 32, scale=0.1) - ratios[1]) < 0.02


def test_unconditional_with_corrector_matches_prior() -> None:
    n = 1000
    prior = _gaussian_prior()
    sampler = Unconditional(steps=64, eta=0.0, corrector_steps=1)
    x = sampler.sample(prior, n, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    C = prior.cov_matrix.to(F64)
    zscore, frob = _moment_errors(_whiten(x, prior.mean.to(F64).expand(n, -1), C.expand(n, -1, -1)))
    assert zscore < Z_BOUND
    assert frob < 2 * _frobenius_bound(n, D), frob


# ---------------------------------------------------------------------------- wild networks
class WildNet(torch.nn.Module):
    """Untrained tanh MLP without preconditioning and with large weights: its Jacobian is large,
    non-symmetric and indefinite at every noise level."""

    def __init__(self, d: int, width: int = 64, gain: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dims = [d + 1, width, width, width, d]
        self.layers = torch.nn.ModuleList()
        for a, b in itertools.pairwise(dims):
            layer = torch.nn.Linear(a, b)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(b, a, generator=g) * gain / math.sqrt(a))
                layer.bias.copy_(torch.randn(b, generator=g))
            self.layers.append(layer)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        h = torch.cat([x, torch.log(sigma).unsqueeze(-1)], dim=-1)
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        return 3.0 * self.layers[-1](h)


def _wild_problem(kind: str, n: int = 128) -> tuple[Tensor, Operator]:
    g = torch.Generator().manual_seed(5)
    if kind == "mask":
        op: Operator = Mask(torch.rand(n, D, generator=g) < 0.5, noise_std=0.0)
    else:
        op = Dense(torch.randn(n, 8, D, generator=g) / 4, noise_std=0.0)
    return op.apply(2 * torch.randn(n, D, generator=g)), op


def _naive_cg(matvec, b: Tensor, iters: int) -> Tensor:
    """Textbook CG without any safeguard."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), (r * r).sum(-1, keepdim=True)
    for _ in range(iters):
        Ap = matvec(p)
        alpha = rr / (p * Ap).sum(-1, keepdim=True)
        x, r = x + alpha * p, r - alpha * Ap
        rr_new = (r * r).sum(-1, keepdim=True)
        p, rr = r + rr_new / rr * p, rr_new
    return x


@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_naive_cg_breaks_but_safeguarded_cg_does_not(kind: str) -> None:
    net = WildNet(D)
    Y, op = _wild_problem(kind, n=256)
    g = torch.Generator().manual_seed(0)
    broken = 0
    for sigma in [1e-3, 1e-1, 1.0, 10.0, 100.0]:
        x_t = (sigma * torch.randn(Y.shape[0], D, generator=g)).requires_grad_()
        x_hat = net(x_t, torch.full((Y.shape[0],), sigma))
        r = Y - op.apply(x_hat.detach())

        def matvec(p: Tensor, x_hat: Tensor = x_hat, x_t: Tensor = x_t, s: float = sigma) -> Tensor:
            (jtw,) = torch.autograd.grad(x_hat, x_t, op.adjoint(p), retain_graph=True)
            return op.noise_var * p + op.apply(s**2 * jtw)

        naive = _naive_cg(matvec, r, 16)
        broken += int((~torch.isfinite(naive)).any())
        ours = conjugate_gradient(matvec, r, max_iter=16)
        assert torch.isfinite(ours.solution).all()
    assert broken >= 3  # the test system really is pathological


WILD_SAMPLERS = [
    MMPS(steps=12, cg_iter=3),
    MMPS(steps=12, cg_iter=1, covariance="gaussian"),
    MMPS(steps=12, cg_iter=2, covariance="isotropic"),
    MMPS(steps=8, cg_iter=2, corrector_steps=1),
    DPS(steps=12),
    PiGDM(steps=12),
    TMPD(steps=12),
    TMPD(steps=8, corrector_steps=1, eta=0.0),
    MMPS(steps=8, cg_iter=3, solver="heun"),
    MMPS(steps=8, cg_iter=1, solver="heun", eta=0.0, corrector_steps=1),
    MMPS(steps=12, cg_iter=3, solver="dpmpp_2m"),
    MMPS(steps=12, cg_iter=1, solver="dpmpp_2m", eta=0.0),
    DPS(steps=8, solver="heun"),
    DPS(steps=12, solver="dpmpp_2m", eta=0.0),
    PiGDM(steps=8, solver="heun", eta=0.0),
    TMPD(steps=8, solver="heun"),
    TMPD(steps=12, solver="dpmpp_2m"),
    SMC(steps=12, particles=4, cg_iter=2),
    SMC(steps=12, particles=3, cg_iter=1, solver="dpmpp_2m", ess_threshold=1.0),
    SMC(steps=8, particles=4, covariance="gaussian", resampling="multinomial"),
]


@pytest.mark.parametrize("kind", ["mask", "dense"])
@pytest.mark.parametrize("sampler", WILD_SAMPLERS, ids=repr)
def test_samplers_finite_on_wild_network(sampler, kind: str) -> None:
    net = WildNet(D)
    Y, op = _wild_problem(kind)
    x = sampler.sample(net, Y, op, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert not x.requires_grad
    assert all(math.isfinite(v) for v in sampler.diagnostics_.values())


@pytest.mark.parametrize("solver", ["ancestral", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_unconditional_finite_on_wild_network(eta: float, solver: str) -> None:
    sampler = Unconditional(steps=12, eta=eta, corrector_steps=1, solver=solver)
    x = sampler.sample(WildNet(D), 64, D)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_mmps_safeguards_engage_on_wild_network() -> None:
    sampler = MMPS(steps=12, cg_iter=3)
    Y, op = _wild_problem("dense")
    sampler.sample(WildNet(D), Y, op, generator=torch.Generator().manual_seed(0))
    assert sampler.diagnostics_["cg_safeguarded"] > 0


# ---------------------------------------------------------------------------- chunking, RNG, API
@pytest.mark.parametrize(
    "sampler",
    [
        MMPS(steps=8, cg_iter=2),
        DPS(steps=8),
        PiGDM(steps=8),
        TMPD(steps=8, corrector_steps=1),
        MMPS(steps=6, cg_iter=2, solver="heun"),
        DPS(steps=6, solver="heun"),
        MMPS(steps=8, cg_iter=2, solver="dpmpp_2m", corrector_steps=1),
    ],
    ids=repr,
)
def test_chunking_is_invisible(sampler) -> None:
    prior = _gaussian_prior()
    Y, op = _problem(prior, "mask", 50)
    full = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(7))
    chunked = clone(sampler).set_params(batch_size=7)
    parts = chunked.sample(prior, Y, op, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(full, parts, atol=1e-10)
    assert not parts.requires_grad


def test_shared_operator_and_reproducibility() -> None:
    prior = _gaussian_prior()
    n = 30
    A = torch.randn(6, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    op = Dense(A, noise_std=0.2)  # batch size 1, shared by all rows
    Y = torch.randn(n, 6, dtype=F64)
    sampler = MMPS(steps=8, cg_iter=2, batch_size=8)
    a = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(1))
    c = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (n, D)


def test_float32_observations_give_float32_samples() -> None:
    prior = _gaussian_prior()
    Y, op = _problem(prior, "dense", 20)
    x = MMPS(steps=8).sample(prior, Y.float(), op, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_get_set_params_and_clone() -> None:
    sampler = MMPS(steps=10, cg_iter=2, covariance="gaussian", batch_size=5)
    params = sampler.get_params()
    assert params["cg_iter"] == 2 and params["covariance"] == "gaussian"
    copy = clone(sampler)
    assert copy.get_params() == params and copy is not sampler
    copy.set_params(cg_iter=5)
    assert copy.cg_iter == 5 and sampler.cg_iter == 2
    for cls in (Unconditional, DPS, PiGDM, TMPD, MMPS):
        assert clone(cls()).get_params() == cls().get_params()
        assert cls().get_params()["solver"] == "ancestral"
        assert cls(solver="heun").get_params()["solver"] == "heun"
        assert clone(cls(solver="dpmpp_2m")).solver == "dpmpp_2m"


def test_input_validation() -> None:
    prior = _gaussian_prior()
    Y, op = _problem(prior, "dense", 10)
    with pytest.raises(ValueError, match="Y"):
        MMPS(steps=4).sample(prior, Y[:, :3], op)
    with pytest.raises(ValueError, match="operator"):
        MMPS(steps=4).sample(prior, Y[:4], op)
    with pytest.raises(TypeError, match="Y"):
        MMPS(steps=4).sample(prior, Y.numpy(), op)
    with pytest.raises(ValueError, match="cg_iter"):
        MMPS(cg_iter=0).sample(prior, Y, op)
    with pytest.raises(ValueError, match="covariance"):
        MMPS(covariance="full").sample(prior, Y, op)
    with pytest.raises(ValueError, match="eta"):
        DPS(eta=2.0).sample(prior, Y, op)
    with pytest.raises(ValueError, match="steps"):
        Unconditional(steps=0).sample(prior, 3, D)
    for cls in (MMPS, DPS, PiGDM, TMPD):
        with pytest.raises(ValueError, match=r"solver.*'rk4'"):
            cls(solver="rk4").sample(prior, Y, op)
    with pytest.raises(ValueError, match="solver"):
        Unconditional(solver="Heun").sample(prior, 3, D)
    with pytest.raises(ValueError, match="solver"):
        MMPS(solver=None).sample(prior, Y, op)
    with pytest.raises(TypeError, match="differentiable"):
        MMPS(steps=2).sample(lambda x, s: prior(x, s).detach(), Y, op)


def test_verbose_progress(capsys: pytest.CaptureFixture[str]) -> None:
    prior = _gaussian_prior()
    x = Unconditional(steps=3, verbose=1).sample(prior, 4, D, dtype=F64)
    assert x.shape == (4, D)


def test_mmps_safeguards_inactive_on_exact_mixture_with_small_sigma_t() -> None:
    # An exact denoiser in float32 at sigma_t down to 1e-3 with sigma_y = 1: the covariance term
    # of the CG curvature is ~1e-12 of the noise term, so the bounds must be checked on it alone.
    d = 40
    grid = torch.arange(-2, 3, dtype=F64) * 8.0
    means = torch.cartesian_prod(grid, grid).repeat(1, d // 2)
    prior = GaussianMixturePrior(
        torch.full((25,), 1 / 25, dtype=F64), means, torch.ones(25, dtype=F64)
    ).to(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    # Orthonormal rows scaled by small singular values, as in the MCGdiff benchmark.
    q, _ = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=F64))
    matrix = (torch.tensor([0.5, 0.05, 0.01, 0.002], dtype=F64)[:, None] * q.T).float()
    op = Dense(matrix, noise_std=1.0).expand(256)
    x = torch.as_tensor(prior.sample(256, generator=g))
    Y = op.apply(x) + torch.randn(256, 4, generator=g)
    sampler = MMPS(steps=64, cg_iter=3, sigma_data=math.sqrt(129.0))
    out = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    assert sampler.diagnostics_["cg_safeguarded"] == 0
    assert sampler.diagnostics_["clipped"] == 0


# ---------------------------------------------------------------------------- cost in VJPs
class _CountingDenoiser:
    """An exact prior whose output counts the backward passes (vector-Jacobian products)."""

    def __init__(self, prior: GaussianPrior) -> None:
        self.prior, self.vjps, self.forwards = prior, 0, 0

    def __call__(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        self.forwards += 1
        out = self.prior(x_t, sigma)
        if out.requires_grad:

            def hook(grad: Tensor) -> Tensor:
                self.vjps += 1
                return grad

            out.register_hook(hook)
        return out


@pytest.mark.parametrize("cg_iter", [1, 2, 5])
@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_mmps_takes_k_vjps_for_k_cg_iterations(cg_iter: int, kind: str) -> None:
    prior = _gaussian_prior()
    Y, op = _problem(prior, kind, 32)
    denoiser = _CountingDenoiser(prior)
    steps = 6
    MMPS(steps=steps, cg_iter=cg_iter, cg_rtol=0.0).sample(denoiser, Y, op)
    assert denoiser.forwards == steps  # one forward pass with graph per step
    assert denoiser.vjps == cg_iter * steps


def test_guidance_of_accumulated_image_equals_explicit_vjp() -> None:
    # cg_iter = k with the image accumulated inside CG gives the same sample as computing
    # sigma^2 J^T A^T u with one more VJP (the covariance "jacobian" vs an explicit product).
    prior = _gaussian_prior()
    Y, op = _problem(prior, "dense", 64)
    sampler = MMPS(steps=8, cg_iter=3)
    x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
    guidance = sampler.guidance()
    x_t = 2.0 * torch.randn(64, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    sigma = torch.full((64,), 0.7, dtype=F64)
    guided = guidance(prior, x_t, sigma, None, op.prepare(Y), op, {})
    x_leaf = x_t.clone().requires_grad_()
    x_hat = prior(x_leaf, sigma)

    def matvec(p: Tensor) -> Tensor:
        (jtw,) = torch.autograd.grad(x_hat, x_leaf, op.adjoint(p), retain_graph=True)
        return op.noise_var * p + op.apply(0.49 * jtw)

    rhs = op.prepare(Y) - op.apply(x_hat.detach())
    u = conjugate_gradient(matvec, rhs, max_iter=3).solution
    (jtw,) = torch.autograd.grad(x_hat, x_leaf, op.adjoint(u))
    torch.testing.assert_close(guided.delta, 0.49 * jtw, rtol=1e-8, atol=1e-10)
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------- SMC
@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_smc_matches_exact_gaussian_posterior(kind: str) -> None:
    # The defaults: one CG iteration (a biased proposal and twisting function, 2.5-4x the
    # floor's covariance error as MMPS) corrected by the weights of 16 particles.
    n = 1000
    prior = _gaussian_prior()
    Y, op = _problem(prior, kind, n)
    m, P = _exact_posterior(prior, Y, op)
    sampler = SMC(steps=64, particles=16, cg_iter=1)
    x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, D) and x.dtype == F64 and not x.requires_grad
    zscore, frob = _moment_errors(_whiten(x, m, P))
    assert zscore < Z_BOUND
    assert frob < _frobenius_bound(n, D), frob
    ess = sampler.ess_
    assert ess.shape == (n,) and ((ess >= 1 - 1e-9) & (ess <= 16 + 1e-9)).all()
    assert sampler.resamples_.shape == (n,) and sampler.diagnostics_["resamples"] > 0


def _mode_calibration(samples: Tensor, means: Tensor, weights: Tensor) -> tuple[float, float]:
    r"""Excess of :math:`E \lVert e_L - w \rVert^2` over its exact value :math:`1 - \sum_k w_k^2`
    (``L`` the sample's mode, ``w`` the exact posterior mode weights), and its standard error.

    For a sampler with mode probabilities ``p`` the excess is :math:`\lVert p - w \rVert^2 \ge 0`,
    averaged over observations; it is 0 exactly when the mode weights are right."""
    labels = torch.cdist(samples, means).argmin(dim=-1)
    onehot = torch.nn.functional.one_hot(labels, means.shape[0]).to(weights.dtype)
    excess = ((onehot - weights) ** 2).sum(-1) - (1 - (weights**2).sum(-1))
    return excess.mean().item(), excess.std().item() / math.sqrt(len(excess))


def test_smc_mixture_error_falls_with_particles() -> None:
    d, n = 4, 600
    means = torch.tensor(
        [[-2.0, -2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, -3.0]], dtype=F64
    )
    prior = GaussianMixturePrior(
        torch.tensor([0.3, 0.5, 0.2], dtype=F64), means, torch.full((3,), 0.25, dtype=F64)
    )
    g = torch.Generator().manual_seed(3)
    x = torch.as_tensor(prior.sample(n, generator=3), dtype=F64)
    # One random projection with moderate noise: bimodal posteriors whose mode weights the
    # Gaussian approximation of MMPS gets wrong.
    op = Dense(torch.randn(n, 1, d, generator=g, dtype=F64) / 2, noise_std=0.3)
    Y = op.apply(x) + 0.3 * torch.randn(n, 1, generator=g, dtype=F64)
    weights = torch.as_tensor(prior.posterior_weights(Y, op), dtype=F64)
    errors = {}
    for particles in (1, 8, 48):
        sampler = SMC(steps=48, particles=particles, cg_iter=1, sigma_data=2.0)
        samples = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
        errors[particles] = _mode_calibration(samples, means, weights)
    (e1, s1), (e8, s8), (e48, s48) = errors[1], errors[8], errors[48]
    # K = 1 is MMPS: a real bias, many standard errors away from 0.
    assert e1 > 4 * s1, errors
    # The error falls with K and is consistent with 0 (no bias left) at K = 48.
    assert e8 < e1 - 3 * math.hypot(s1, s8), errors
    assert e48 < e8 + 3 * math.hypot(s8, s48), errors
    assert abs(e48) < 4 * s48, errors


def test_smc_draws_and_validation() -> None:
    prior = _gaussian_prior()
    Y, op = _problem(prior, "mask", 12)
    sampler = SMC(steps=6, particles=5, batch_size=20)
    draws = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0), n_samples=3)
    assert draws.shape == (12, 3, D) and torch.isfinite(draws).all()
    again = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0), n_samples=3)
    assert torch.equal(draws, again)
    assert clone(SMC(particles=7)).get_params()["particles"] == 7
    for bad, match in [
        ({"particles": 0}, "particles"),
        ({"eta": 0.0}, "eta"),
        ({"solver": "heun"}, "solver"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"resampling": "stratified"}, "resampling"),
        ({"corrector_steps": 1}, "corrector_steps"),
        ({"warm_start": True}, "warm_start"),
    ]:
        with pytest.raises(ValueError, match=match):
            SMC(steps=4, **bad).sample(prior, Y, op)


def test_warm_start_costs_one_product_and_reaches_the_exact_posterior() -> None:
    prior = _gaussian_prior()
    Y, op = _problem(prior, "dense", 32)
    denoiser = _CountingDenoiser(prior)
    MMPS(steps=6, cg_iter=2, cg_rtol=0.0, warm_start=True).sample(denoiser, Y, op)
    assert denoiser.vjps == 2 * 6 + 5  # no start at the first step
    # Two warm-started CG iterations per step accumulate to the exact solve (8 measurements):
    # at the floor where cold-started ones are 4x above it.
    n = 1000
    Y, op = _problem(prior, "dense", n)
    m, P = _exact_posterior(prior, Y, op)
    bound = _frobenius_bound(n, D)
    frob = {}
    for warm in (False, True):
        sampler = MMPS(steps=64, cg_iter=2, solver="dpmpp_2m", warm_start=warm)
        x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
        zscore, frob[warm] = _moment_errors(_whiten(x, m, P))
    assert zscore < Z_BOUND
    assert frob[True] < bound < frob[False], frob


def _floor_mean(n: int, d: int, reps: int = 300) -> float:
    """Mean of ``||S - I||_F`` over exact N(0, I) sample sets of size ``n``: the floor."""
    g = torch.Generator().manual_seed(4321)
    z = torch.randn(reps, n, d, generator=g, dtype=F64)
    S = z.mT @ z / n
    return torch.linalg.matrix_norm(S - torch.eye(d, dtype=F64)).mean().item()


@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_estimator_default_sampler_is_at_the_exact_posterior_floor(kind: str) -> None:
    from diffem import DiffusionPriorEM

    n = 1000
    prior = _gaussian_prior()
    Y, op = _problem(prior, kind, n)
    estimator = DiffusionPriorEM(n_iter=0, device="cpu", random_state=0).fit(Y.float(), op)
    sampler = estimator.sampler_  # the default, with the schedule and scale set from the data
    m, P = _exact_posterior(prior, Y, op)
    x = sampler.sample(prior, Y, op, generator=torch.Generator().manual_seed(0))
    zscore, frob = _moment_errors(_whiten(x, m, P))
    assert zscore < Z_BOUND
    floor = _floor_mean(n, D)
    assert frob < 1.2 * floor, (frob, floor)
    diag = sampler.diagnostics_
    assert diag["cg_safeguarded"] == 0 and diag["clipped"] == 0 and diag["fallback"] == 0
