r"""Common machinery of diffem's samplers: the noise levels, the ODE/SDE solvers, the Langevin
corrector, chunking over observations, and the guided-denoiser protocol of posterior samplers.

All samplers integrate the variance-exploding process :math:`x_t = x + \sigma_t z` backwards
over the levels ``VESchedule(sigma_min, sigma_max).discretize(steps)`` (``steps`` decreasing
levels, then 0), starting from :math:`x_T \sim \mathcal{N}(0, \sigma_{\max}^2 I)`. Given a
(guided) denoiser :math:`D(x, \sigma) \approx E[x \mid x_\sigma = x]` (or
:math:`E[x \mid x_\sigma = x, y]` for posterior sampling), a step from :math:`\sigma_t` to
:math:`\sigma_s < \sigma_t` is made by one of three solvers (``solver``).

``"ancestral"`` (first order, one evaluation per step): the step of Song, Meng & Ermon (2021,
"Denoising Diffusion Implicit Models") with :math:`\hat{x} = D(x_t, \sigma_t)`,

.. math::
    x_s = \hat{x} + \sqrt{\sigma_s^2 - \tau^2} \, \frac{x_t - \hat{x}}{\sigma_t} + \tau z,
    \qquad \tau = \eta \, \sigma_s \sqrt{1 - \sigma_s^2 / \sigma_t^2},

with :math:`\eta = 1` the DDPM posterior :math:`q(x_s \mid x_t, \hat{x})` (Ho et al., 2020) and
:math:`\eta = 0` the deterministic DDIM update. Write :math:`c = \sqrt{\sigma_s^2 - \tau^2} /
\sigma_t`, so that :math:`x_s = c \, x_t + (1 - c) \hat{x} + \tau z`.

``"heun"`` (second order, two evaluations per step): Karras, Aittala, Aila & Laine (2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", EDM), algorithms 1 and 2,
on the probability-flow ODE :math:`dx / d\sigma = (x - D(x, \sigma)) / \sigma`. The noise is
first raised ("churn") to :math:`\hat\sigma = \sqrt{\sigma_t^2 + \tau^2}` with the same
:math:`\tau` as the ancestral step, :math:`\hat{x} = x_t + \tau z`; then

.. math::
    k_1 = \frac{\hat{x} - D(\hat{x}, \hat\sigma)}{\hat\sigma}, \quad
    x' = \hat{x} + (\sigma_s - \hat\sigma) k_1, \quad
    k_2 = \frac{x' - D(x', \sigma_s)}{\sigma_s}, \quad
    x_s = \hat{x} + (\sigma_s - \hat\sigma) \frac{k_1 + k_2}{2},

and the last step (:math:`\sigma_s = 0`) is the Euler step :math:`x_0 = D(\hat{x}, \hat\sigma)`.
In EDM's notation :math:`\hat\sigma = (1 + \gamma) \sigma_t` with
:math:`\gamma = \sqrt{1 + \tau^2 / \sigma_t^2} - 1 \le \sqrt{5} / 2 - 1 \approx 0.118`, below
EDM's cap :math:`\sqrt{2} - 1`; :math:`\eta = 0` is the deterministic algorithm 1.

``"dpmpp_2m"`` (second order, one evaluation per step): the multistep exponential integrator in
:math:`\lambda = -\log \sigma` of Lu, Zhou, Bao, Chen, Li & Zhu (2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", algorithm 2 and its SDE variant),
i.e. the ancestral step with :math:`\hat{x}` replaced by a linear extrapolation in
:math:`\lambda` through the previous step's estimate :math:`\hat{x}_{\text{prev}}`,

.. math::
    x_s = c \, x_t + (1 - c) \Big(\hat{x} + \frac{h}{2 h_{\text{prev}}}
    (\hat{x} - \hat{x}_{\text{prev}})\Big) + \tau z, \qquad h = \log(\sigma_t / \sigma_s),

which is DPM-Solver++(2M) for :math:`\eta = 0` and SDE-DPM-Solver++(2M) for :math:`\eta = 1`.
The first step has no :math:`\hat{x}_{\text{prev}}` and the last one (:math:`\sigma_s = 0`)
returns :math:`\hat{x}`: both are first order.

Accuracy (``steps`` noise levels, one exact Gaussian prior or posterior, exact denoiser):
see :class:`Sampler`.

Optionally, ``corrector_steps`` Langevin steps (the predictor-corrector scheme of Song et al.,
2021, "Score-Based Generative Modeling through Stochastic Differential Equations", algorithm 5)
run at each level before the predictor step, with the (posterior) score
:math:`s = (\hat{x} - x_t) / \sigma_t^2`:

.. math::
    x_t \leftarrow x_t + \epsilon s + \sqrt{2 \epsilon} z, \qquad
    \epsilon = \min\!\big(2 (r \lVert z \rVert / \lVert s \rVert)^2, \sigma_t^2\big)

per sample, with ``r = corrector_snr``.

Posterior samplers wrap the denoiser: each defines a correction :math:`\delta` with
:math:`E[x \mid x_t, y] \approx \hat{x} + \delta`, :math:`\delta \approx \sigma_t^2
\nabla_{x_t} \log q(y \mid x_t)`, and runs the same solvers on :math:`\hat{x} + \delta`.

Randomness is drawn from ``generator`` for all ``n`` rows at once, step by step, while the
denoiser runs on chunks of ``batch_size`` rows: the samples therefore do not depend on
``batch_size``, and no autograd graph outlives its chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from diffem.operators.base import Operator
from diffem.schedule import VESchedule

__all__ = ["SOLVERS", "PosteriorSampler", "Sampler", "ancestral_step"]

#: The ``solver`` options of all samplers.
SOLVERS = ("ancestral", "heun", "dpmpp_2m")

# mean_fn(x_t, sigma, weight, chunk_index) -> guided E[x | x_t], see Sampler._mean_all.
MeanFn = Callable[[Tensor, Tensor, Tensor | None, int], Tensor]


def ancestral_coefficients(sigma_t: float, sigma_s: float, eta: float) -> tuple[float, float]:
    r"""``(c, tau)`` of the ancestral step :math:`\sigma_t \to \sigma_s`:
    :math:`\tau = \eta \sigma_s \sqrt{1 - \sigma_s^2 / \sigma_t^2}`,
    :math:`c = \sqrt{\sigma_s^2 - \tau^2} / \sigma_t` (both 0 when :math:`\sigma_s = 0`)."""
    if sigma_s <= 0.0:
        return 0.0, 0.0
    ratio2 = (sigma_s / sigma_t) ** 2
    tau = eta * sigma_s * math.sqrt(max(1.0 - ratio2, 0.0))
    return math.sqrt(max(sigma_s**2 - tau**2, 0.0)) / sigma_t, tau


def ancestral_step(
    x_t: Tensor,
    x_hat: Tensor,
    sigma_t: float,
    sigma_s: float,
    eta: float,
    noise: Tensor | None,
) -> Tensor:
    r"""One step :math:`\sigma_t \to \sigma_s` (see the module docstring).

    ``x_t``, ``x_hat``, ``noise``: ``(n, D)``. ``noise`` may be ``None`` when :math:`\tau = 0`.
    """
    if sigma_s <= 0.0:
        return x_hat
    coef, tau = ancestral_coefficients(sigma_t, sigma_s, eta)
    x_s = x_hat + coef * (x_t - x_hat)
    if tau > 0.0 and noise is not None:
        x_s = x_s + tau * noise
    return x_s


def _check_number(
    value: Any, name: str, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}.")
    return float(value)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


class Sampler(BaseEstimator):
    r"""Base class of diffem's samplers (scikit-learn parameters, solvers, chunking).

    Subclasses store their constructor arguments verbatim (so that ``get_params``,
    ``set_params`` and ``sklearn.base.clone`` work) and are validated when sampling.

    Common parameters
    -----------------
    steps : int
        Number of denoising steps (noise levels :math:`\sigma_{\max} > \dots > \sigma_{\min}`,
        then 0).
    eta : float in [0, 1]
        Stochasticity: the noise :math:`\tau` re-injected per step (module docstring). With the
        ancestral solver 1 is DDPM and 0 is DDIM; with the others 0 is deterministic.
    solver : {"ancestral", "heun", "dpmpp_2m"}
        Step of the reverse process (module docstring): the first-order DDPM/DDIM step (one
        (guided) denoiser evaluation per step), EDM's second-order Heun step with churn (two
        evaluations per step but the last, ``2 * steps - 1`` in all), or the second-order
        multistep DPM-Solver++(2M) (one evaluation per step). ``steps`` is the number of noise
        levels for all three.

        Accuracy with an exact denoiser on the default log-linear schedule
        :math:`\sigma \in [10^{-3}, 10^2]`. *1-D*: final variance over the true one of a 1-D
        Gaussian prior (exact, by propagating the linear maps; nearly independent of the
        prior's scale). *prior*: :math:`\lVert S - I \rVert_F` of 2000 whitened samples of
        :class:`Unconditional` from the ``D = 16`` Gaussian prior of the tests (covariance
        eigenvalues in [0.1, 3.1]; sampling noise alone: about 0.37, test bound 0.47).
        *mask*, *dense*: the same for 1000 samples of :class:`~diffem.samplers.MMPS`
        (``cg_iter=16``, so the guided denoiser is exact) from the Gaussian posteriors of the
        tests (random masks, random ``8 x 16`` projections; noise std 0.1; sampling noise
        alone: about 0.52, test bound 0.68). *evals*: (guided) denoiser evaluations per sample.

        ========= === ===== ===== ===== ===== ===== =====
        solver    eta steps evals 1-D   prior mask  dense
        ========= === ===== ===== ===== ===== ===== =====
        ancestral 1   16    16    0.511 1.98  2.01  2.00
        ancestral 1   32    32    0.706 1.21  1.25  1.26
        ancestral 1   64    64    0.838 0.72  0.78  0.79
        ancestral 1   128   128   0.915 0.47  0.58  0.60
        ancestral 0   16    16    0.681 1.27  1.28  1.28
        ancestral 0   32    32    0.830 0.71  0.75  0.76
        ancestral 0   64    64    0.913 0.45  0.55  0.56
        ancestral 0   128   128   0.956 0.37  0.50  0.51
        heun      0   16    31    1.189 0.92  1.04  1.05
        heun      0   32    63    1.038 0.43  0.57  0.59
        heun      0   64    127   1.009 0.38  0.52  0.54
        heun      1   16    31    1.223 1.07  1.11  1.17
        heun      1   32    63    1.057 0.41  0.57  0.58
        heun      1   64    127   1.016 0.35  0.56  0.57
        dpmpp_2m  0   16    16    1.058 0.48  0.62  0.63
        dpmpp_2m  0   32    32    1.016 0.39  0.54  0.55
        dpmpp_2m  0   64    64    1.004 0.37  0.52  0.53
        dpmpp_2m  1   16    16    1.110 0.54  0.70  0.77
        dpmpp_2m  1   32    32    1.042 0.38  0.53  0.52
        dpmpp_2m  1   64    64    1.011 0.36  0.53  0.58
        ========= === ===== ===== ===== ===== ===== =====

        At equal evaluations the second-order solvers are far more accurate than the ancestral
        one (which under-disperses), and DPM-Solver++(2M) is the most accurate per evaluation:
        Heun's steps in :math:`\sigma` are poor at the large, log-spaced noise levels, where
        the exponential integrator in :math:`\log \sigma` is exact for a linear denoiser.
        The churn of ``"heun"`` with ``eta > 0`` adds a little over-dispersion.
    sigma_min, sigma_max : float
        Range of the log-linear variance-exploding schedule (:class:`diffem.schedule.VESchedule`).
    batch_size : int
        Number of rows given to the denoiser at once; bounds memory (one autograd graph per
        chunk).
    corrector_steps : int
        Langevin corrector steps per noise level (0: predictor only).
    corrector_snr : float
        Signal-to-noise ratio :math:`r` setting the Langevin step size.
    verbose : int
        Shows a progress bar over the steps when positive.
    """

    # Filled by subclasses' __init__.
    steps: int
    eta: float
    solver: str
    sigma_min: float
    sigma_max: float
    batch_size: int
    corrector_steps: int
    corrector_snr: float
    verbose: int
    # Denoiser evaluations (over all rows) of the last call, counted by _mean_all.
    _evaluations: int = 0

    # ------------------------------------------------------------------ validation
    def _validate_common(self) -> None:
        _check_int(self.steps, "steps", 1)
        _check_number(self.eta, "eta", 0.0, 1.0)
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        VESchedule(self.sigma_min, self.sigma_max)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.corrector_steps, "corrector_steps", 0)
        _check_number(self.corrector_snr, "corrector_snr", 0.0, low_open=True)
        _check_int(int(self.verbose), "verbose", 0)

    def _validate(self) -> None:
        self._validate_common()

    def levels(self) -> list[float]:
        """The noise levels :math:`\\sigma_{\\max} > \\dots > \\sigma_{\\min} > 0`, then 0."""
        schedule = VESchedule(float(self.sigma_min), float(self.sigma_max))
        return schedule.discretize(int(self.steps)).tolist()

    # ------------------------------------------------------------------ the loop
    def _progress(self, iterable: Iterable[int], total: int) -> Iterable[int]:
        if self.verbose and self.verbose > 0:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=type(self).__name__, leave=False)
        return iterable

    def _chunks(self, n: int) -> list[slice]:
        size = int(self.batch_size)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _mean_all(
        self,
        mean_fn: MeanFn,
        x: Tensor,
        sigma: float,
        weight: float | None,
        chunks: list[slice],
    ) -> Tensor:
        r"""Applies ``mean_fn`` chunk by chunk; ``sigma`` and ``weight`` are passed as ``(B,)``
        tensors.

        ``weight`` is the coefficient of this evaluation's output in the solver's update of
        ``x``, times the number of evaluations of the step: :math:`1 - c` for the ancestral
        and DPM-Solver++ steps, :math:`1 - \sigma_s / \hat\sigma` and
        :math:`\hat\sigma / \sigma_s - 1` for Heun's two evaluations, 1 for the last step;
        ``None`` for corrector steps. (DPS uses it to turn its gradient step into a guided
        denoiser.)
        """
        self._evaluations += 1
        out = torch.empty_like(x)
        for k, chunk in enumerate(chunks):
            x_c = x[chunk]
            s = torch.full((x_c.shape[0],), sigma, dtype=x.dtype, device=x.device)
            w = None if weight is None else torch.full_like(s, weight)
            out[chunk] = mean_fn(x_c, s, w, k).detach()
        return out

    def _randn(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    def _langevin(
        self,
        mean_fn: MeanFn,
        x: Tensor,
        sigma: float,
        chunks: list[slice],
        generator: torch.Generator | None,
    ) -> Tensor:
        """One Langevin corrector step at level ``sigma`` (Song et al., 2021, algorithm 5)."""
        score = (self._mean_all(mean_fn, x, sigma, None, chunks) - x) / sigma**2
        z = self._randn(x, generator)
        score_norm = torch.linalg.vector_norm(score, dim=-1)
        z_norm = torch.linalg.vector_norm(z, dim=-1)
        good = (score_norm > 0) & torch.isfinite(score_norm)
        eps = 2.0 * (self.corrector_snr * z_norm / torch.where(good, score_norm, 1.0)) ** 2
        eps = torch.where(good, eps.clamp(max=sigma**2), 0.0).unsqueeze(-1)
        score = torch.where(good.unsqueeze(-1), score, 0.0)
        return x + eps * score + torch.sqrt(2.0 * eps) * z

    def _run(
        self,
        mean_fn: MeanFn,
        n: int,
        n_features: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Samples ``n`` rows of dimension ``n_features`` with ``mean_fn`` and ``self.solver``.

        Counts the evaluations of ``mean_fn`` (over all rows) in ``self._evaluations``.
        """
        levels = self.levels()
        chunks = self._chunks(n)
        eta = float(self.eta)
        self._evaluations = 0
        x = levels[0] * torch.randn(
            (n, n_features), generator=generator, dtype=dtype, device=device
        )
        previous: tuple[Tensor, float] | None = None  # DPM-Solver++(2M): (x_hat, h)
        steps = len(levels) - 1
        for i in self._progress(range(steps), steps):
            sigma_t, sigma_s = levels[i], levels[i + 1]
            for _ in range(int(self.corrector_steps)):
                x = self._langevin(mean_fn, x, sigma_t, chunks, generator)
            coef, tau = ancestral_coefficients(sigma_t, sigma_s, eta)
            if self.solver == "heun":
                x = self._heun_step(mean_fn, x, sigma_t, sigma_s, tau, chunks, generator)
                continue
            x_hat = self._mean_all(mean_fn, x, sigma_t, 1.0 - coef, chunks)
            if self.solver == "dpmpp_2m" and sigma_s > 0:
                h = math.log(sigma_t / sigma_s)
                if previous is not None:
                    x_prev, h_prev = previous
                    previous = (x_hat, h)
                    x_hat = x_hat + (h / (2.0 * h_prev)) * (x_hat - x_prev)
                else:
                    previous = (x_hat, h)
            noise = self._randn(x, generator) if tau > 0 else None
            x = ancestral_step(x, x_hat, sigma_t, sigma_s, eta, noise)
        return x

    def _heun_step(
        self,
        mean_fn: MeanFn,
        x: Tensor,
        sigma_t: float,
        sigma_s: float,
        tau: float,
        chunks: list[slice],
        generator: torch.Generator | None,
    ) -> Tensor:
        """EDM's stochastic Heun step (Karras et al., 2022, algorithm 2), module docstring."""
        sigma_hat = sigma_t
        if tau > 0:
            x = x + tau * self._randn(x, generator)
            sigma_hat = math.sqrt(sigma_t**2 + tau**2)
        if sigma_s <= 0.0:
            return self._mean_all(mean_fn, x, sigma_hat, 1.0, chunks)
        ratio = sigma_s / sigma_hat
        d1 = self._mean_all(mean_fn, x, sigma_hat, 1.0 - ratio, chunks)
        # Euler predictor x' = x + (sigma_s - sigma_hat) k1, written without k1's 1 / sigma.
        x_euler = d1 + ratio * (x - d1)
        d2 = self._mean_all(mean_fn, x_euler, sigma_s, 1.0 / ratio - 1.0, chunks)
        # x + (sigma_s - sigma_hat) (k1 + k2) / 2 with k1 = (x - d1) / sigma_hat and
        # k2 = (x_euler - d2) / sigma_s.
        step = sigma_s - sigma_hat
        return x + 0.5 * step * ((x - d1) / sigma_hat + (x_euler - d2) / sigma_s)


def _resolve_dtype_device(
    denoiser: Any, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    if dtype is None or device is None:
        params = getattr(denoiser, "parameters", None)
        first = None
        if callable(params):
            try:
                first = next(iter(params()), None)
            except (TypeError, StopIteration):
                first = None
        if dtype is None:
            dtype = first.dtype if first is not None else torch.get_default_dtype()
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
    return dtype, torch.device(device)


class PosteriorSampler(Sampler):
    r"""Base class of posterior samplers: guided denoisers :math:`\hat{x} + \delta`.

    Subclasses implement :meth:`_correction`, returning :math:`\hat{x} = E[x \mid x_t]` and the
    guidance :math:`\delta \approx \sigma_t^2 \nabla_{x_t} \log q(y \mid x_t)` for one chunk,
    and may record floats in ``stats`` (averaged into :attr:`diagnostics_`).
    """

    def _correction(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        x_t: Tensor,
        sigma: Tensor,
        weight: Tensor | None,
        y: Tensor,
        operator: Operator,
        stats: dict[str, list[Tensor]],
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_inputs(self, denoiser: Any, Y: Any, operator: Any) -> tuple[Tensor, Operator]:
        if not callable(denoiser):
            raise TypeError(
                "denoiser must be a callable denoiser(x_t, sigma) -> E[x | x_t], got "
                f"{type(denoiser).__name__}."
            )
        if not isinstance(operator, Operator):
            raise TypeError(
                f"operator must be a diffem.operators.Operator, got {type(operator).__name__}."
            )
        if not isinstance(Y, Tensor):
            raise TypeError(f"Y must be a torch.Tensor of shape (n, M), got {type(Y).__name__}.")
        if not Y.is_floating_point():
            raise TypeError(f"Y must be a floating-point tensor, got dtype {Y.dtype}.")
        m = operator.n_measurements
        if Y.ndim != 2 or Y.shape[1] != m or Y.shape[0] == 0:
            raise ValueError(
                f"Y must have shape (n, M) = (n, {m}) with n >= 1 to match the operator, got "
                f"{tuple(Y.shape)}."
            )
        if len(operator) not in (1, Y.shape[0]):
            raise ValueError(
                f"operator must have batch size 1 or n = {Y.shape[0]} (the rows of Y), got "
                f"{len(operator)}."
            )
        operator = operator.to(device=Y.device, dtype=Y.dtype)
        return operator.prepare(Y), operator

    def sample(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        Y: Tensor,
        operator: Operator,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""One posterior sample per observation, :math:`x_i \sim q(x \mid y_i)`.

        Parameters
        ----------
        denoiser : callable
            ``denoiser(x_t, sigma) -> E[x | x_t]`` on ``(B, D)`` tensors, ``sigma`` of shape
            ``(B,)``; differentiable in ``x_t``.
        Y : Tensor, shape ``(n, M)``
            Observations (unobserved entries of a mask may be NaN).
        operator : Operator
            Batch of ``n`` (or 1, shared) observation operators.
        generator : torch.Generator, optional
            Source of all randomness.

        Returns
        -------
        Tensor, shape ``(n, D)``, dtype and device of ``Y``, without autograd graph.
        """
        self._validate()
        Y, operator = self._check_inputs(denoiser, Y, operator)
        start = time.perf_counter()
        n, d = Y.shape[0], operator.n_features
        chunks = self._chunks(n)
        shared = len(operator) == 1
        ops = [operator if shared else operator[c] for c in chunks]
        stats: dict[str, list[Tensor]] = {"fallback": []}

        def mean_fn(x_t: Tensor, sigma: Tensor, weight: Tensor | None, k: int) -> Tensor:
            x_hat, delta = self._correction(
                denoiser, x_t, sigma, weight, Y[chunks[k]], ops[k], stats
            )
            x_hat = x_hat.detach()
            delta = delta.detach()
            bad = ~torch.isfinite(delta).all(dim=-1, keepdim=True)
            stats["fallback"].append(bad.to(x_t.dtype).flatten())
            return x_hat + torch.where(bad, torch.zeros_like(delta), delta)

        x = self._run(mean_fn, n, d, Y.dtype, Y.device, generator)
        self.diagnostics_ = self._summarise(stats, time.perf_counter() - start)
        self.diagnostics_["evaluations"] = float(self._evaluations)
        return x.detach()

    @staticmethod
    def _summarise(stats: dict[str, list[Tensor]], wall_time: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, values in stats.items():
            if values:
                out[key] = float(torch.cat([v.detach().flatten().double() for v in values]).mean())
        out["wall_time"] = float(wall_time)
        return out


def denoise_with_graph(
    denoiser: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Runs the denoiser with autograd enabled; returns ``(x_t_leaf, x_hat)``.

    Raises ``TypeError`` if the output does not depend differentiably on ``x_t``.
    """
    x_leaf = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        x_hat = denoiser(x_leaf, sigma)
    if not isinstance(x_hat, Tensor) or x_hat.shape != x_t.shape:
        shape = tuple(x_hat.shape) if isinstance(x_hat, Tensor) else type(x_hat).__name__
        raise ValueError(f"denoiser must return a tensor of shape {tuple(x_t.shape)}, got {shape}.")
    if not x_hat.requires_grad:
        raise TypeError(
            "denoiser output is not differentiable with respect to x_t; guided samplers take "
            "vector-Jacobian products through it (do not wrap it in torch.no_grad)."
        )
    return x_leaf, x_hat


def vjp(x_hat: Tensor, x_leaf: Tensor, v: Tensor, retain_graph: bool = True) -> Tensor:
    r""":math:`J^\top v` with :math:`J = \partial \hat{x} / \partial x_t`, shape ``(B, D)``."""
    (grad,) = torch.autograd.grad(x_hat, x_leaf, v, retain_graph=retain_graph, allow_unused=True)
    if grad is None:
        return torch.zeros_like(x_leaf)
    return grad
