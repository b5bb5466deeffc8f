r"""The scikit-learn estimator :class:`DiffusionPriorEM`.

Learning a diffusion prior from observations by expectation-maximisation (Rozet, Andry, Lanusse
& Louppe, 2024, "Learning Diffusion Priors from Observations by Expectation Maximization",
NeurIPS). The observations are :math:`y_i = A_i x_i + e_i`, :math:`e_i \sim \mathcal{N}(0,
\Sigma_i)`; the latents :math:`x_i` are never seen. Empirical Bayes looks for the prior
:math:`q_\theta(x)` that maximises the mean log-evidence
:math:`E_{p(y)}[\log q_\theta(y)]`, :math:`q_\theta(y) = \int p(y \mid x) q_\theta(x)\,dx`. For
any :math:`\theta_k`, the EM update (the paper's eqs. (5)-(6))

.. math::
    \theta_{k+1} = \arg\max_\theta E_{p(y)} E_{q_{\theta_k}(x \mid y)}
    \big[\log q_\theta(x) + \log p(y \mid x)\big]
    = \arg\max_\theta E_{p(y)} E_{q_{\theta_k}(x \mid y)}\big[\log q_\theta(x)\big]

never decreases the mean log-evidence. With a diffusion model, the E-step draws posterior
samples :math:`x_i \sim q_{\theta_k}(x \mid y_i)` with a posterior sampler and the M-step trains
the denoiser on them by denoising score matching, warm-started from :math:`\theta_k`. The EM
starts from a Gaussian prior fitted by closed-form EM (:func:`diffem.priors.fit_gaussian`), whose
exact posterior gives the first E-step. The recipe (the defaults) and its measurements are in
the documentation (``docs/em_recipe.md``).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from diffem._device import loadable_device, resolve_device
from diffem._random import draw_seed as _seed
from diffem._random import torch_generator as _generator
from diffem._validation import check_image_shape, check_int
from diffem.denoisers import Denoiser, DivergenceError, MLPDenoiser, UNetDenoiser
from diffem.em._interrupt import InterruptFlag
from diffem.em._persistence import dumps, loads
from diffem.em._progress import EpochProgress, em_progress, postfix
from diffem.em.checkpoint import find_checkpoint, fingerprint, save_checkpoint
from diffem.em.distributed import DataParallel, data_parallel_training, resolve_data_parallel
from diffem.em.evidence import moment_matched_gaussian, reference_sample_size
from diffem.em.prior import DiffusionPrior
from diffem.em.validation import check_observations, check_params, resolve_operator
from diffem.operators import Operator
from diffem.priors import GaussianPrior, fit_gaussian, fit_gaussian_mixture
from diffem.priors.base import AnalyticPrior
from diffem.samplers import MMPS, SMC

__all__ = ["DiffusionPriorEM", "default_sampler"]

# Fitted attributes holding tensors; pickled through torch.save so that they can be mapped to
# the CPU when CUDA is unavailable at load time.
_TORCH_ATTRIBUTES = (
    "denoiser_",
    "sampler_",
    "evidence_sampler_",
    "gaussian_prior_",
    "init_prior_",
    "proposal_",
    "_network",
    "_e_samples",
)


def default_sampler() -> MMPS:
    r"""The accurate single-particle sampler: ``MMPS(steps=64, cg_iter=3, solver="dpmpp_2m",
    warm_start=True)``, one forward pass and four vector-Jacobian products per step. With an
    exact Gaussian denoiser its posterior means and covariances are at the sampling floor
    (tested); the residual guard (:func:`diffem.samplers.guidance.residual_guard`)
    keeps the accurate solve from throwing samples off the data with a learned denoiser."""
    return MMPS(steps=64, cg_iter=3, solver="dpmpp_2m", warm_start=True)


def _sub_seed(base: int, *keys: int) -> int:
    """Independent seeds per EM iteration and stage, from one base seed."""
    return int(np.random.SeedSequence([base, *keys]).generate_state(1)[0])


def recipe_sampler() -> SMC:
    r"""The accurate E-step sampler of ``DiffusionPriorEM(sampler=None)``, also its
    ``sample_posterior`` and ``transform``: twisted SMC with 32 DPM-Solver++(2M) steps, 8
    particles per observation and three CG iterations (:class:`~diffem.samplers.SMC`). Its
    importance weights remove the samples that the moment-matching Gaussian approximation puts
    where the prior has no mass (multimodal posteriors); with an exact Gaussian denoiser its
    posterior covariances are at the sampling floor (tested)."""
    return SMC(steps=32, particles=8, cg_iter=3, solver="dpmpp_2m")


def recipe_warmup_sampler() -> SMC:
    r"""The cheap E-step sampler of the first ``warmup_iter`` iterations of
    ``DiffusionPriorEM(sampler=None, warmup_sampler=None)``: twisted SMC with 16 steps, 8
    particles and one CG iteration, a quarter of :func:`recipe_sampler`'s cost."""
    return SMC(steps=16, particles=8, cg_iter=1, solver="dpmpp_2m")


def recipe_denoiser(image_shape: Sequence[int] | None = None) -> Denoiser:
    r"""The denoiser of ``DiffusionPriorEM(denoiser=None)``, or the recommended one for images.

    Without ``image_shape``: :class:`MLPDenoiser` (3 residual blocks of width 256) with an
    exponential moving average of its weights (decay 0.999), used by the E-step, and a fresh
    learning-rate cosine per M-step. With ``image_shape = (C, H, W)`` (the rows of ``Y`` being
    flattened images): :class:`UNetDenoiser` with two resolution levels of 16 and 32 channels,
    the same EMA, and training noise levels drawn log-normally around the middle of the
    schedule (``sigma_distribution="log_normal"``). The estimator sees flat vectors and cannot
    know the shape: pass ``denoiser=recipe_denoiser(image_shape)`` for images."""
    if image_shape is None:
        return MLPDenoiser(ema_decay=0.999)
    return UNetDenoiser(
        image_shape=check_image_shape(image_shape),
        module__channels=(16, 32),
        sigma_distribution="log_normal",
        ema_decay=0.999,
    )


def recipe_evidence_sampler() -> SMC:
    r"""The evidence estimator of ``DiffusionPriorEM(evidence_sampler=None)``: twisted SMC with
    32 DPM-Solver++(2M) steps, 64 particles and one CG iteration, whose normalising constant
    estimates :math:`q_\theta(y_i)` (consistent as the particles grow, biased low by
    :math:`O(1/K)`)."""
    return SMC(steps=32, particles=64, cg_iter=1, solver="dpmpp_2m")


class DiffusionPriorEM(TransformerMixin, BaseEstimator):
    r"""Learn a diffusion-model prior from corrupted observations by expectation-maximisation.

    Observations are :math:`y_i = A_i x_i + e_i` with linear operators :math:`A_i` and diagonal
    Gaussian noise (a :class:`diffem.operators.Operator`, or ``None`` for direct observations
    with missing entries marked NaN), or :math:`y_i = f(x_i; \theta_i) + e_i` with a
    differentiable :class:`diffem.operators.Nonlinear` operator: the samplers linearise it at
    each step's denoiser estimate, and the Gaussian initialisation, its first E-step and the
    proposal of :meth:`score_samples` use its linearisation about each posterior mean
    (:mod:`diffem.priors.linearize`). The fit starts from a Gaussian prior :math:`q_0`
    (closed-form EM, :func:`diffem.priors.fit_gaussian`), draws ``e_step_samples`` exact
    posterior samples per observation from it, then runs ``n_iter`` EM iterations
    (Rozet et al., 2024, eqs. (5)-(6)), iteration :math:`k` being

    .. math::
        \text{M-step: } \theta_k = \arg\min_\theta \frac{1}{nS} \sum_{i,s}
        E_{\sigma, z}\big[\lambda(\sigma) \lVert D_\theta(x_{is} + \sigma z, \sigma) - x_{is}
        \rVert^2\big], \qquad
        \text{E-step: } x_{is} \sim q_{\theta_k}(x \mid y_i),

    the M-step warm-started from :math:`\theta_{k-1}` (``denoiser.partial_fit``), the E-step
    with the posterior sampler, which also estimates the mean log-evidence
    :math:`\frac1n \sum_i \log q_{\theta_k}(y_i)` that EM increases (``history_``). The fit stops
    early when that evidence stops rising (``tol``, ``n_iter_no_change``).

    Parameters
    ----------
    denoiser : diffem.denoisers.Denoiser or None
        The learned denoiser (unfitted; the estimator fits a clone). ``None``:
        :func:`recipe_denoiser`. Its ``sigma_data`` is set from the scale of the data (the root
        mean square of the Gaussian initialisation), its ``device`` to the estimator's, and its
        ``random_state`` (when ``None``) from ``random_state``.
    sampler : diffem.samplers.PosteriorSampler or None
        The E-step's posterior sampler (cloned) after the warm-up, also used by
        :meth:`sample_posterior` and :meth:`transform`. ``None``: :func:`recipe_sampler`,
        twisted SMC with 8 particles (:func:`default_sampler` is the accurate single-particle
        MMPS). Its ``sigma_min`` and ``sigma_max`` are set to the denoiser's and its
        ``sigma_data`` (if any) to the data scale.
    n_iter : int, default=16
        Maximum number of EM iterations. ``0`` gives the Gaussian prior (then every method is
        exact).
    noise_std : float, default=0.0
        Observation noise std when ``operator=None``.
    device : {"auto", "cpu", "cuda", ...} or torch.device, default="auto"
        Where sampling and training run; ``"auto"`` picks CUDA when available. Data stay on
        the CPU and move to the device in chunks of ``batch_size``.
    random_state : int, numpy.random.RandomState or None
        Makes ``fit``, ``sample``, ``sample_posterior``, ``transform`` and ``score_samples``
        reproducible on the same device (a method's own ``random_state`` overrides it).
    verbose : int, default=0
        ``1``: a progress bar over EM iterations (with the loss, the evidence and the
        timings); ``2``: also over the sampling steps and training epochs.
    warmup_sampler : diffem.samplers.PosteriorSampler or None
        The cheaper E-step sampler of the first ``warmup_iter`` iterations, while the prior is
        still far from the data's. ``None``: :func:`recipe_warmup_sampler` when ``sampler`` is
        ``None`` too, else ``sampler`` itself (no warm-up).
    warmup_iter : int, default=4
        Number of EM iterations whose E-step uses ``warmup_sampler``.
    e_step_samples : int, default=4
        Posterior samples per observation drawn by each E-step: the M-step trains on
        ``n * e_step_samples`` samples. With SMC they are drawn from each observation's
        particles (at no extra cost; correlated when above the effective sample size).
    reset_optimizer : bool, default=False
        Whether each M-step starts with a fresh optimizer state (as in the paper's code)
        instead of the previous M-step's.
    first_epochs : int or None, default=None
        Epochs of the first M-step, which fits the network to the exact posterior samples of
        the analytic start, the farthest from EM's fixed point; ``None``: the denoiser's
        ``max_epochs``, as every other M-step. EM raises the evidence only with an M-step
        that maximises its objective: a first M-step too short to fit leaves a prior worse
        than the start.
    lr_decay : float, default=1.0
        The M-step of iteration :math:`k` trains with learning rate
        ``denoiser.lr * lr_decay ** (k - 1)`` (and the denoiser's schedule within the M-step):
        decreasing steps let the M-step noise vanish, as stochastic-approximation EM needs.
    evidence_sampler : diffem.samplers.SMC or None
        The sampler whose normalising constants estimate the evidence of every iteration's
        prior on ``evidence_rows`` observations (the last particle system's estimate
        :math:`\log \hat{Z}_i` of :math:`\log q_\theta(y_i)`, ``SMC.log_evidence_``).
        ``None``: :func:`recipe_evidence_sampler`.
    evidence_rows : int or None, default=128
        Observations (a fixed random subset of the training ones) on which the evidence is
        estimated after every iteration; ``None``: all. Its cost is ``evidence_rows`` times
        ``evidence_sampler``'s particles times its steps guided denoiser evaluations.
    tol : float or None, default=0.01
        The evidence must rise by more than ``tol`` (nats per observation) over its best value
        to count as an improvement. ``None``: no early stopping.
    n_iter_no_change : int or None, default=4
        Stop when ``n_iter_no_change`` consecutive iterations bring no improvement
        (``converged_`` is then true); when ``n_iter`` runs out first, a
        :class:`~sklearn.exceptions.ConvergenceWarning` is issued. ``None``: run ``n_iter``
        iterations, without warning.
    keep_best : bool, default=True
        Whether the fitted prior is that of the iteration with the highest evidence
        (``best_iteration_``) rather than the last one.
    init_components : int, default=1
        Components of the analytic prior that EM starts from: ``1`` is the Gaussian of the
        paper; more is a Gaussian mixture fitted by extreme deconvolution
        (:func:`diffem.priors.fit_gaussian_mixture`, ``4 * gaussian_iter`` iterations), whose
        exact posterior gives the first E-step.
    init_shrinkage : float, default=0.0
        Pseudo-observations pulling that mixture's component covariances towards the
        Gaussian's (``shrinkage`` of :func:`diffem.priors.fit_gaussian_mixture`): full
        covariances are ill-posed when each observation sees few features.
    refine_init : bool, default=True
        Whether the network refines the analytic initialisation's exact denoiser (the
        denoiser's ``base``): :math:`D_\theta = D_0 + c_{\text{out}} F_\theta` with
        :math:`F_\theta` starting at zero, so that the first M-step starts from the very prior
        whose posterior the first E-step sampled, and learns only what it lacks.
    gaussian_iter : int, default=16
        Iterations of the closed-form Gaussian EM of the initialisation.
    gaussian_rank : int or None, default=None
        Rank of the Gaussian initialisation's covariance (PPCA-style low rank plus diagonal),
        for large dimensions, and of each component's with ``init_components > 1``; ``None`` is
        a full covariance.
    n_transform_samples : int, default=16
        Posterior samples averaged by :meth:`transform` for a diffusion prior.
    n_score_samples : int, default=16
        Importance samples ``K`` per observation of :meth:`score_samples` for a diffusion prior:
        its cost is proportional, its standard error falls as :math:`1/\sqrt{K}`.
    score_steps : int, default=8
        Heun steps of the probability-flow ODE that gives :math:`\log q(x)` in
        :meth:`score_samples` (cost proportional; error :math:`O(1/\text{steps}^2)`).
    batch_size : int, default=4096
        Rows per E-step chunk (bounds device memory), and proposals per ODE batch in
        :meth:`score_samples`.
    checkpoint_dir : str, path or None, default=None
        If set, the state is saved there after every EM iteration, and ``fit`` resumes from
        the latest compatible checkpoint (same hyper-parameters and data).
    callback : callable or None, default=None
        ``callback(estimator, record)`` is called after the Gaussian initialisation (with
        ``record = {"iteration": 0, "log_evidence": ..., "log_evidence_std": ...}``, the exact
        evidence of the Gaussian) and after every completed EM iteration (with that
        iteration's ``history_`` record), the estimator then holding that iteration's prior:
        e.g. to evaluate or plot the prior along EM. It must not refit the estimator.
    distributed : {"auto", True, False}, default="auto"
        Data-parallel EM across the processes of a launcher (``torchrun --nproc-per-node N
        script.py``; see :mod:`diffem.em.distributed`): each rank samples the E-step of its
        shard of the observations, the M-step averages the gradients over the ranks, and every
        rank ends with the same estimator. ``"auto"`` does so when the launcher's environment
        (``WORLD_SIZE > 1``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``) or an initialised
        process group is found, ``True`` requires it, ``False`` ignores it (a single-process
        fit in every process). NCCL on CUDA (``cuda:LOCAL_RANK``), gloo on the CPU.

    Attributes
    ----------
    prior_ : diffem.priors.GaussianPrior or diffem.em.DiffusionPrior
        The learned prior, with ``sample``, ``sample_posterior``, ``posterior_mean`` and
        ``log_evidence``; every public method delegates to it.
    denoiser_ : Denoiser or GaussianPrior
        The learned prior's denoiser :math:`E[x \mid x_t]`; the Gaussian prior when the fit
        kept no diffusion iteration.
    sampler_ : PosteriorSampler
        The E-step sampler, with the schedule used.
    gaussian_prior_ : GaussianPrior
        The Gaussian initialisation.
    proposal_ : GaussianPrior
        The Gaussian moment-matched (empirical covariance) to
        :func:`~diffem.em.evidence.reference_sample_size` unconditional samples of the kept
        prior, drawn at the end of ``fit``: its posteriors are the importance proposals of
        :meth:`score_samples`, and its flow the reference of the probability-flow ODE. Absent
        while the kept prior is the analytic initialisation.
    proposal_seconds_ : float
        Wall seconds ``fit`` spent drawing those samples (part of ``fit``'s time). Absent with
        ``proposal_``.
    history_ : list of dict
        One record per completed EM iteration: ``iteration``, ``m_step_seconds``,
        ``train_loss`` (last epoch), ``n_epochs``, ``e_step_seconds``, the E-step sampler's
        diagnostics prefixed ``sampler_``, ``sample_mean`` and ``sample_std`` (of the E-step
        samples), and the evidence of the iteration's prior: ``log_evidence`` (mean over the
        observations of the estimate of :math:`\log q_{\theta_k}(y_i)`), ``log_evidence_std``
        (its standard error), ``log_evidence_change`` and ``log_evidence_change_std`` (the mean
        change from the previous iteration over the same observations, and its standard error),
        ``log_evidence_rows`` (observations used).
    initial_log_evidence_ : float
        The exact mean log-evidence of the Gaussian initialisation.
    n_iter_ : int
        Completed EM iterations.
    best_iteration_ : int
        The iteration whose prior is kept (``keep_best``; else the last); 0 is the Gaussian.
    converged_ : bool
        Whether the evidence stopped rising before ``n_iter`` (``tol``, ``n_iter_no_change``).
    n_features_in_ : int
        Dimension ``D`` of the latents.
    device_ : torch.device
        Where the prior lives.
    sigma_data_ : float
        Data scale given to the denoiser and sampler.
    interrupted_ : bool
        Whether ``fit`` was stopped by ``KeyboardInterrupt`` (then the estimator holds the
        prior of the last completed iteration).
    resumed_from_ : int or None
        The EM iteration ``fit`` resumed from (``checkpoint_dir``), else ``None``.

    Notes
    -----
    *Evidence.* With an SMC E-step, the evidence of iteration :math:`k` is the logarithm of the
    particle system's normalising-constant estimate (:class:`~diffem.samplers.SMC`,
    ``log_evidence_``), for every training observation: it is consistent as the particles grow
    (biased low by :math:`O(1/K)`), and free. Differences between iterations are paired over the
    same observations, so their standard error is much smaller than that of each value.

    *Interruption.* ``KeyboardInterrupt`` (Ctrl-C) during an EM iteration restores the state of
    the last completed iteration (the denoiser weights from before the interrupted M-step),
    sets ``interrupted_``, warns, and returns ``self``, like skorch's training loop: the
    notebook cell finishes with a usable estimator. An interrupt during the Gaussian
    initialisation is re-raised (there is nothing to keep).

    *Divergence.* A non-finite training loss (or non-finite E-step samples) raises
    :class:`diffem.denoisers.DivergenceError` after restoring the state of the last completed
    iteration, so that the estimator stays usable.

    *Persistence.* Pickling (``joblib.dump``) stores tensors through ``torch.save``; loading a
    model fitted on CUDA on a machine without CUDA maps everything to the CPU (with a
    warning), and sampling with the same ``random_state`` gives the same samples on the same
    device.

    Examples
    --------
    >>> import numpy as np
    >>> from diffem import DiffusionPriorEM
    >>> Y = np.random.default_rng(0).normal(size=(200, 3)).astype("float32")
    >>> Y[::2, 0] = np.nan                                  # missing entries
    >>> est = DiffusionPriorEM(n_iter=0, noise_std=0.1).fit(Y)   # Gaussian prior
    >>> est.transform(Y).shape                              # imputed posterior means
    (200, 3)
    """

    def __init__(
        self,
        denoiser: Any = None,
        sampler: Any = None,
        n_iter: int = 16,
        noise_std: float = 0.0,
        device: str | torch.device = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        *,
        warmup_sampler: Any = None,
        warmup_iter: int = 4,
        e_step_samples: int = 4,
        reset_optimizer: bool = False,
        first_epochs: int | None = None,
        lr_decay: float = 1.0,
        evidence_sampler: Any = None,
        evidence_rows: int | None = 128,
        tol: float | None = 0.01,
        n_iter_no_change: int | None = 4,
        keep_best: bool = True,
        init_components: int = 1,
        init_shrinkage: float = 0.0,
        refine_init: bool = True,
        gaussian_iter: int = 16,
        gaussian_rank: int | None = None,
        n_transform_samples: int = 16,
        n_score_samples: int = 16,
        score_steps: int = 8,
        batch_size: int = 4096,
        checkpoint_dir: Any = None,
        callback: Any = None,
        distributed: Any = "auto",
    ) -> None:
        self.denoiser = denoiser
        self.sampler = sampler
        self.n_iter = n_iter
        self.noise_std = noise_std
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warmup_sampler = warmup_sampler
        self.warmup_iter = warmup_iter
        self.e_step_samples = e_step_samples
        self.reset_optimizer = reset_optimizer
        self.first_epochs = first_epochs
        self.lr_decay = lr_decay
        self.evidence_sampler = evidence_sampler
        self.evidence_rows = evidence_rows
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.keep_best = keep_best
        self.init_components = init_components
        self.init_shrinkage = init_shrinkage
        self.refine_init = refine_init
        self.gaussian_iter = gaussian_iter
        self.gaussian_rank = gaussian_rank
        self.n_transform_samples = n_transform_samples
        self.n_score_samples = n_score_samples
        self.score_steps = score_steps
        self.batch_size = batch_size
        self.checkpoint_dir = checkpoint_dir
        self.callback = callback
        self.distributed = distributed

    # ------------------------------------------------------------------ scikit-learn tags
    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.estimator_type = "density_estimator"
        tags.target_tags.required = False
        # NaN marks missing entries when operator=None (the estimator is then an imputer).
        tags.input_tags.allow_nan = True
        if tags.transformer_tags is not None:
            tags.transformer_tags.preserves_dtype = ["float32"]
        # A diffusion prior's transform and score are Monte Carlo estimates.
        tags.non_deterministic = self.n_iter != 0
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, Y: Any, operator: Operator | None = None, *, y: Any = None) -> DiffusionPriorEM:
        r"""Learn the prior from observations ``Y`` ``(n, M)`` of operator ``operator``.

        Parameters
        ----------
        Y : array-like or tensor of shape ``(n_samples, n_measurements)``
            Observations. Unobserved entries of a :class:`~diffem.operators.Mask` may be NaN;
            with ``operator=None`` NaN marks missing entries.
        operator : Operator or None
            ``n`` per-sample operators, or a shared one (batch 1). ``None``: ``Y`` observes
            ``X`` directly, with noise std ``noise_std`` (a ``Mask`` if ``Y`` has NaN, else
            ``Identity``). A 1-D array of length ``n`` (the ``y`` that scikit-learn passes to
            unsupervised estimators) is ignored like ``None``.
        y : None
            Keyword alias of ``operator``, for scikit-learn code that passes the second
            argument by the name ``y``.

        Returns
        -------
        self
        """
        operator = _operator_alias(operator, y)
        check_params(self)
        Y_np = check_observations(Y, estimator=self, min_samples=2)
        op = resolve_operator(operator, Y_np, noise_std=float(self.noise_std))
        Y_t = op.prepare(torch.from_numpy(Y_np).to(op.dtype))  # raises on NaN where observed
        device = resolve_device(self.device)
        # distributed hook: the launcher's process group (None in a single process)
        group = resolve_data_parallel(self.distributed, device)
        device = device if group is None else group.device
        self._reset_fitted()

        base_seed = _seed(self.random_state)
        if group is not None:
            base_seed = group.broadcast_int(base_seed)  # the same EM on every rank
        key = payload = None
        if self.checkpoint_dir is not None:
            key = fingerprint(self.get_params(deep=True), Y_np, op)
            payload = find_checkpoint(self.checkpoint_dir, key, int(self.n_iter))
        if payload is not None:
            self._restore_payload(payload, device)
            base_seed = int(payload["seed"])
            self.resumed_from_ = int(payload["iteration"])
        else:
            self._initialise(Y_t, op, device, base_seed)
            if self.callback is not None:
                self.callback(self, self._initial_record())

        self._data_parallel = group  # distributed hook, read by the E- and M-steps
        flag = InterruptFlag()
        main = group is None or group.is_main
        bar = em_progress(int(self.n_iter), self.n_iter_, int(self.verbose)) if main else None
        try:
            with flag.watch():
                while self.n_iter_ < int(self.n_iter) and not self.converged_:
                    if not self._em_iteration(self.n_iter_ + 1, Y_t, op, base_seed, flag):
                        break
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(postfix(self.history_[-1]))
                    if key is not None and main:
                        self._save_checkpoint(key, base_seed)
                    if self.callback is not None:
                        self.callback(self, self.history_[-1])
        except KeyboardInterrupt:
            # between two iterations (progress bar, checkpoint): the state is complete
            self.interrupted_ = True
            warnings.warn(
                f"DiffusionPriorEM.fit was interrupted after EM iteration {self.n_iter_}; the "
                "estimator holds the prior of that iteration.",
                UserWarning,
                stacklevel=2,
            )
        finally:
            if bar is not None:
                bar.close()
            del self._data_parallel
        self._finish(base_seed)
        return self

    def fit_transform(
        self, Y: Any, operator: Operator | None = None, *, y: Any = None
    ) -> np.ndarray:
        """``fit(Y, operator).transform(Y, operator)``: posterior means ``(n, D)``.

        ``y`` is a keyword alias of ``operator`` (see :meth:`fit`).
        """
        operator = _operator_alias(operator, y)
        return self.fit(Y, operator).transform(Y, operator)

    # ------------------------------------------------------------------ fit: pieces
    def _reset_fitted(self) -> None:
        for name in list(vars(self)):
            if (name.endswith("_") and not name.startswith("__")) or name in _PRIVATE_STATE:
                delattr(self, name)
        self.interrupted_ = False
        self.resumed_from_ = None

    def _initialise(self, Y: Tensor, op: Operator, device: torch.device, base_seed: int) -> None:
        """The analytic initialisation, the cloned denoiser and samplers with consistent
        schedules, and the first E-step: exact posterior samples of the initialisation."""
        self.n_features_in_ = op.n_features
        self.device_ = device
        self._fit_analytic(Y, op, device, base_seed)
        denoiser = self._configured_denoiser(device, base_seed)
        self.sampler_ = self._configured(
            recipe_sampler() if self.sampler is None else self.sampler, denoiser
        )
        if self.warmup_sampler is not None:
            self._warmup_sampler = self._configured(self.warmup_sampler, denoiser)
        elif self.sampler is None:
            self._warmup_sampler = self._configured(recipe_warmup_sampler(), denoiser)
        else:
            self._warmup_sampler = self.sampler_
        evidence = (
            recipe_evidence_sampler() if self.evidence_sampler is None else self.evidence_sampler
        )
        self.evidence_sampler_ = self._configured(evidence, denoiser)
        self._network = denoiser  # the network being trained (unfitted until the first M-step)
        self._initial_lr = float(getattr(denoiser, "lr", math.nan))
        self.denoiser_ = self.init_prior_
        self.history_: list[dict[str, Any]] = []
        self.n_iter_ = 0
        self.best_iteration_ = 0
        self.converged_ = False
        init = self.init_prior_.to(device)
        exact = torch.as_tensor(init.log_evidence(Y, op), dtype=torch.float64)
        self.initial_exact_log_evidence_ = float(exact.mean())
        self.initial_log_evidence_ = self.initial_exact_log_evidence_
        # keep_best chooses among the EM iterations (the analytic start is iteration 0)
        self._best = {"evidence": -math.inf, "iteration": 0, "network": None}
        self._no_change = 0
        self._initial_stats: dict[str, float] = {}
        if int(self.n_iter) == 0:
            return
        # The first E-step samples the analytic prior's exact posterior; its evidence is also
        # estimated as every iteration's will be, so that the changes compare like with like.
        generator = _generator(_sub_seed(base_seed, 0, 2), device)
        samples = init.sample_posterior(Y, op, int(self.e_step_samples), generator)
        self._e_samples = torch.from_numpy(samples)
        self._evidence_rows = _evidence_rows(len(Y), self.evidence_rows, base_seed)
        self._last_evidence = self._evidence(init, Y, op, _sub_seed(base_seed, 0, 5))
        self.initial_log_evidence_ = float(self._last_evidence.mean())
        self._initial_stats = _sample_stats(self._e_samples)

    def _fit_analytic(self, Y: Tensor, op: Operator, device: torch.device, base_seed: int) -> None:
        """The Gaussian fitted by closed-form EM (``gaussian_prior_``, which sets the data
        scale) and the prior EM starts from (``init_prior_``: that Gaussian, or a mixture)."""
        prior = fit_gaussian(
            Y,
            op,
            n_iter=int(self.gaussian_iter),
            rank=self.gaussian_rank,
            random_state=_sub_seed(base_seed, 0, 0),
            device=device,
        )
        self.gaussian_prior_ = prior.to("cpu")
        mean = self.gaussian_prior_.mean.double()
        variance = _prior_variances(self.gaussian_prior_)
        scale = math.sqrt(float(variance.mean() + (mean**2).mean()))
        self.sigma_data_ = scale if math.isfinite(scale) and scale > 0 else 1.0
        self.init_prior_ = self.gaussian_prior_
        if int(self.init_components) > 1:
            self.init_prior_ = fit_gaussian_mixture(
                Y,
                op,
                int(self.init_components),
                n_iter=4 * int(self.gaussian_iter),
                shrinkage=float(self.init_shrinkage),
                rank=self.gaussian_rank,
                random_state=_sub_seed(base_seed, 0, 4),
                device=device,
            ).to("cpu")

    def _configured_denoiser(self, device: torch.device, base_seed: int) -> Any:
        """A clone of ``denoiser`` on the data scale, the device, a seed, and refining the
        analytic initialisation (``refine_init``)."""
        denoiser = recipe_denoiser() if self.denoiser is None else clone(self.denoiser)
        params = denoiser.get_params(deep=False)
        new: dict[str, Any] = {}
        if "sigma_data" in params:
            new["sigma_data"] = self.sigma_data_
        if "device" in params:
            new["device"] = str(device)
        if params.get("random_state", 0) is None:
            new["random_state"] = _sub_seed(base_seed, 0, 1)
        if self.refine_init and "base" in params and params["base"] is None:
            new["base"] = self.init_prior_
        if self.verbose >= 2 and "callbacks" in params:
            callbacks = list(params["callbacks"] or [])
            new["callbacks"] = [*callbacks, ("em_progress", EpochProgress())]
        denoiser.set_params(**new)
        sigma_max = float(getattr(denoiser, "sigma_max", 1e2))
        if int(self.n_iter) > 0 and sigma_max < 10 * self.sigma_data_:
            warnings.warn(
                f"the data scale ({self.sigma_data_:.3g}) is not small compared to the "
                f"denoiser's sigma_max ({sigma_max:.3g}); standardise the data or raise "
                "denoiser__sigma_max.",
                stacklevel=4,
            )
        return denoiser

    def _configured(self, sampler: Any, denoiser: Any) -> Any:
        """A clone of ``sampler`` on the denoiser's schedule and the data scale."""
        sampler = clone(sampler)
        sampler_params = sampler.get_params(deep=False)
        new = {
            "sigma_min": float(getattr(denoiser, "sigma_min", sampler_params.get("sigma_min"))),
            "sigma_max": float(getattr(denoiser, "sigma_max", sampler_params.get("sigma_max"))),
            "sigma_data": self.sigma_data_,
            "verbose": int(self.verbose >= 2),
        }
        sampler.set_params(**{k: v for k, v in new.items() if k in sampler_params})
        return sampler

    def _initial_record(self) -> dict[str, Any]:
        """What the callback receives for the analytic initialisation (iteration 0)."""
        record: dict[str, Any] = {
            "iteration": 0,
            "log_evidence": self.initial_log_evidence_,
            "log_evidence_exact": self.initial_exact_log_evidence_,
        }
        last = getattr(self, "_last_evidence", None)
        if last is not None and len(last) > 1:
            record["log_evidence_std"] = float(last.std() / math.sqrt(len(last)))
        return {**record, **self._initial_stats}

    def _em_iteration(
        self, k: int, Y: Tensor, op: Operator, base_seed: int, flag: InterruptFlag
    ) -> bool:
        """Runs EM iteration ``k`` (1-based): M-step on the current E-step samples, then the
        E-step of the new prior with its evidence. Returns ``False`` if it was interrupted."""
        network = self._network
        backup = copy.deepcopy(network) if self.n_iter_ > 0 else None
        record: dict[str, Any] = {"iteration": k}
        try:
            # M-step: denoising score matching on the E-step samples, warm-started.
            tic = time.perf_counter()
            epochs_before = len(network.history) if _initialized(network) else 0
            if self.reset_optimizer and _initialized(network):
                network.initialize_optimizer()
            if "lr" in network.get_params(deep=False):
                network.set_params(lr=self._initial_lr * float(self.lr_decay) ** (k - 1))
            X = self._e_samples.reshape(-1, self.n_features_in_)
            epochs = network.get_params(deep=False).get("max_epochs")
            first = k == 1 and self.first_epochs is not None and epochs is not None
            try:
                if first:
                    network.set_params(max_epochs=int(self.first_epochs))
                self._partial_fit(network, X, _sub_seed(base_seed, k, 2))
            finally:
                if first:
                    network.set_params(max_epochs=epochs)
            record["m_step_seconds"] = time.perf_counter() - tic
            if flag.raised:  # skorch stopped training on Ctrl-C and returned normally
                raise KeyboardInterrupt
            history = network.history
            record["n_epochs"] = len(history) - epochs_before
            record["n_steps"] = sum(len(epoch["batches"]) for epoch in history[epochs_before:])
            record["train_loss"] = float(history[-1]["train_loss"]) if len(history) else math.nan
            # E-step: posterior samples of the new prior, and its evidence.
            tic = time.perf_counter()
            generator = _generator(_sub_seed(base_seed, k, 0), self.device_)
            samples = self._e_step(Y, op, generator)
            record["e_step_seconds"] = time.perf_counter() - tic
            if not bool(torch.isfinite(samples).all()):
                raise DivergenceError(
                    f"the E-step of EM iteration {k} produced non-finite samples."
                )
            sampler = self._e_step_sampler(k)
            record.update({f"sampler_{key}": v for key, v in _diagnostics(sampler).items()})
            tic = time.perf_counter()
            evidence = self._evidence(network, Y, op, _sub_seed(base_seed, 0, 5))
            record["evidence_seconds"] = time.perf_counter() - tic
        except KeyboardInterrupt:
            self._rollback(backup)
            self.interrupted_ = True
            warnings.warn(
                f"DiffusionPriorEM.fit was interrupted during EM iteration {k}; the "
                f"estimator holds the prior of iteration {self.n_iter_} "
                f"({'Gaussian' if self.n_iter_ == 0 else 'diffusion'}).",
                UserWarning,
                stacklevel=3,
            )
            return False
        except DivergenceError as error:
            self._rollback(backup)
            raise DivergenceError(
                f"DiffusionPriorEM diverged at EM iteration {k}: {error} The estimator was "
                f"restored to iteration {self.n_iter_} and is usable; refit with a smaller "
                "denoiser__lr or more sampler steps."
            ) from error
        record.update(_sample_stats(samples))
        record.update(self._evidence_summary(evidence))
        # score hook during the fit (callbacks): the Gaussian moment-matched to the samples the
        # new prior was trained on; _finish replaces it with one from the kept prior's samples
        self.proposal_ = moment_matched_gaussian(self._e_samples.reshape(-1, self.n_features_in_))
        self._e_samples = samples
        self._last_evidence = evidence
        self.denoiser_ = network
        self.n_iter_ = k
        self.history_.append(record)
        self._track_convergence(record["log_evidence"], k, network)
        return True

    def _e_step_sampler(self, k: int) -> Any:
        """The E-step sampler of EM iteration ``k``: cheaper during the warm-up."""
        return self._warmup_sampler if k <= int(self.warmup_iter) else self.sampler_

    def _e_step(self, Y: Tensor, op: Operator, generator: torch.Generator) -> Tensor:
        """``e_step_samples`` posterior samples per observation of the prior being trained,
        float32 CPU ``(n, e_step_samples, D)``; distributed hook: each rank samples its shard
        of the rows, and the shards are all-gathered so that every rank holds all samples."""
        sampler = self._e_step_sampler(self.n_iter_ + 1)
        prior = self._diffusion_prior(self._network, sampler)
        S, D = int(self.e_step_samples), self.n_features_in_
        group: DataParallel | None = getattr(self, "_data_parallel", None)
        if group is None:
            return torch.from_numpy(prior.sample_posterior(Y, op, S, generator))
        rows = group.shard(len(Y))
        generator = group.rank_generator(generator)
        if rows.stop > rows.start:
            part = torch.from_numpy(prior.sample_posterior(Y[rows], op[rows], S, generator))
        else:  # more ranks than observations
            part = torch.zeros(0, S, D)
        return group.all_gather_rows(part.reshape(len(part), S * D), len(Y)).reshape(-1, S, D)

    def _partial_fit(self, network: Any, X: Tensor, seed: int) -> None:
        """``network.partial_fit(X)``; distributed hook: data-parallel on this rank's part of
        the samples (equal sizes on every rank, a random partition drawn from ``seed``)."""
        group: DataParallel | None = getattr(self, "_data_parallel", None)
        if group is None:
            network.partial_fit(X)
            return
        with data_parallel_training(network, group):
            network.partial_fit(X[group.m_step_rows(len(X), seed)])

    def _diffusion_prior(self, denoiser: Any, sampler: Any) -> DiffusionPrior:
        return DiffusionPrior(
            denoiser,
            sampler,
            getattr(self, "proposal_", self.gaussian_prior_),
            n_mean_samples=int(self.n_transform_samples),
            n_score_samples=int(self.n_score_samples),
            score_steps=int(self.score_steps),
            min_noise_std=1e-3 * float(self.sigma_data_),
            batch_size=int(self.batch_size),
            device=self.device_,
            verbose=int(self.verbose >= 2),
        )

    def _evidence(self, denoiser: Any, Y: Tensor, op: Operator, seed: int) -> Tensor:
        """Log-evidence estimates of the prior of ``denoiser`` on the evidence rows, float64
        ``(rows,)``: the normalising constants of ``evidence_sampler_`` (twisted SMC), with the
        same random numbers at every iteration (common random numbers make the changes between
        iterations more precise than the values)."""
        rows = self._evidence_rows
        prior = self._diffusion_prior(denoiser, self.evidence_sampler_)
        generator = _generator(seed, self.device_)
        prior.sample_posterior(Y[rows], op if len(op) == 1 else op[rows], 1, generator)
        return torch.as_tensor(prior.sampler_log_evidence_, dtype=torch.float64)

    def _evidence_summary(self, evidence: Tensor) -> dict[str, float]:
        """The ``log_evidence*`` entries of a record from the per-observation estimates
        (NaN where not estimated), paired with the previous iteration's on the same rows."""
        known = torch.isfinite(evidence)
        values = evidence[known]
        n = max(int(known.sum()), 1)
        both = known & torch.isfinite(self._last_evidence)
        change = (evidence - self._last_evidence)[both]
        m = max(int(both.sum()), 1)
        return {
            "log_evidence": float(values.mean()),
            "log_evidence_std": float(values.std() / math.sqrt(n)) if n > 1 else math.nan,
            "log_evidence_change": float(change.mean()),
            "log_evidence_change_std": float(change.std() / math.sqrt(m)) if m > 1 else math.nan,
            "log_evidence_rows": n,
        }

    def _track_convergence(self, evidence: float, k: int, network: Any) -> None:
        """scikit-learn's rule: an improvement is a rise of more than ``tol`` over the best
        evidence; ``n_iter_no_change`` iterations without one mean convergence."""
        best = self._best["evidence"]
        tol = 0.0 if self.tol is None else float(self.tol)
        if math.isfinite(evidence) and (evidence > best or not math.isfinite(best)):
            keep = copy.deepcopy(network) if self.keep_best else None
            self._best = {"evidence": evidence, "iteration": k, "network": keep}
        if math.isfinite(evidence) and evidence > best + tol:
            self._no_change = 0
        else:
            self._no_change += 1
        if self.tol is not None and self.n_iter_no_change is not None:
            self.converged_ = self._no_change >= int(self.n_iter_no_change)

    def _finish(self, base_seed: int) -> None:
        """After the loop: the kept prior (``keep_best``), its score proposal, the convergence
        warning, and the E-step samples dropped (they only serve the next M-step of a running
        fit)."""
        best = getattr(self, "_best", None)
        if self.keep_best and best is not None and best["iteration"] != self.n_iter_:
            self.best_iteration_ = int(best["iteration"])
            if best["network"] is None:  # no EM iteration has a finite evidence
                self.denoiser_ = self.init_prior_
                if hasattr(self, "proposal_"):
                    del self.proposal_
            else:
                self.denoiser_ = best["network"]
        else:
            self.best_iteration_ = self.n_iter_
        if self.denoiser_ is not self.init_prior_:
            self._fit_proposal(base_seed)
        if (
            not self.converged_
            and not self.interrupted_
            and self.tol is not None
            and self.n_iter_no_change is not None
            and int(self.n_iter) > 0
        ):
            warnings.warn(
                f"DiffusionPriorEM reached n_iter = {self.n_iter} EM iterations before the "
                f"evidence stopped rising (by more than tol = {self.tol} over its best, within "
                f"{self.n_iter_no_change} iterations); EM has not converged: increase n_iter.",
                ConvergenceWarning,
                stacklevel=3,
            )
        for name in _PRIVATE_STATE:
            if hasattr(self, name):
                delattr(self, name)

    def _fit_proposal(self, base_seed: int) -> None:
        r"""``proposal_``: the Gaussian moment-matched to
        :func:`~diffem.em.evidence.reference_sample_size` unconditional samples of the kept
        prior (empirical covariance), the reference of :meth:`score_samples`. Part of ``fit``
        (its time is ``proposal_seconds_``); every rank of a distributed fit draws the same
        samples."""
        tic = time.perf_counter()
        prior = self._diffusion_prior(self.denoiser_, self.sampler_)
        n = reference_sample_size(self.n_features_in_)
        generator = _generator(_sub_seed(base_seed, self.best_iteration_, 6), self.device_)
        self.proposal_ = moment_matched_gaussian(prior._sample_torch(n, generator))
        self.proposal_seconds_ = time.perf_counter() - tic

    def _rollback(self, backup: Any) -> None:
        """Restores the network of the last completed iteration."""
        if backup is not None:
            self._network = backup
            self.denoiser_ = backup
        elif self.n_iter_ == 0:
            # nothing trained yet: a fresh, unfitted clone for a later fit
            self._network = clone(self._network)
            self.denoiser_ = self.init_prior_

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, key: str, base_seed: int) -> None:
        state = {name: getattr(self, name) for name in _STATE if hasattr(self, name)}
        save_checkpoint(
            self.checkpoint_dir,
            self.n_iter_,
            {"fingerprint": key, "seed": base_seed, "state": dumps(state)},
        )

    def _restore_payload(self, payload: dict[str, Any], device: torch.device) -> None:
        for name, value in loads(payload["state"]).items():
            setattr(self, name, value)
        self._move_to(device)

    def _move_to(self, device: torch.device) -> None:
        """Puts the fitted state on ``device`` (the network's weights and ``device`` param)."""
        self.device_ = device
        for name in ("_network", "denoiser_"):
            network = getattr(self, name, None)
            if (
                network is not None
                and hasattr(network, "to")
                and not isinstance(network, GaussianPrior)
            ):
                network.to(device)

    # ------------------------------------------------------------------ prediction
    @property
    def prior_(self) -> AnalyticPrior | DiffusionPrior:
        """The learned prior (the analytic initialisation when no diffusion iteration is
        kept); see :mod:`diffem.em.prior`."""
        check_is_fitted(self, ("denoiser_", "gaussian_prior_"))
        if isinstance(self.denoiser_, AnalyticPrior):
            return self.denoiser_.to(self.device_)
        return self._diffusion_prior(self.denoiser_, self.sampler_)

    def _check_predict(self, Y: Any, operator: Any) -> tuple[Tensor, Operator]:
        check_is_fitted(self, ("denoiser_", "gaussian_prior_", "n_features_in_"))
        Y_np = check_observations(Y, estimator=self)
        op = resolve_operator(
            operator, Y_np, noise_std=float(self.noise_std), n_features=self.n_features_in_
        )
        Y_t = op.prepare(torch.from_numpy(Y_np).to(op.dtype))
        return Y_t, op

    def _predict_generator(self, random_state: Any) -> torch.Generator:
        state = self.random_state if random_state is None else random_state
        return _generator(_seed(state), self.device_)

    def sample(self, n_samples: int = 1, random_state: Any = None) -> np.ndarray:
        """Samples of the learned prior, NumPy float32 ``(n_samples, D)``.

        The diffusion prior is sampled with :class:`~diffem.samplers.Unconditional` using the
        E-step sampler's ``steps``, ``solver`` and schedule, deterministically (the
        probability-flow ODE, :class:`~diffem.em.DiffusionPrior`'s ``sample_eta=0``).
        ``random_state`` defaults to the estimator's.
        """
        prior = self.prior_
        n_samples = check_int(n_samples, "n_samples", 1)
        return _float32(prior.sample(n_samples, generator=self._predict_generator(random_state)))

    def sample_posterior(
        self,
        Y: Any,
        operator: Operator | None = None,
        n_samples: int = 1,
        random_state: Any = None,
    ) -> np.ndarray:
        r"""Samples of :math:`q(x \mid y_i)`, NumPy float32 ``(n, n_samples, D)``.

        Exact for the Gaussian prior; with ``sampler_`` for a diffusion prior (with SMC, the
        ``n_samples`` of an observation come from its particle system). ``random_state``
        defaults to the estimator's.
        """
        Y_t, op = self._check_predict(Y, operator)
        n_samples = check_int(n_samples, "n_samples", 1)
        generator = self._predict_generator(random_state)
        return _float32(self.prior_.sample_posterior(Y_t, op, n_samples, generator))

    def transform(self, Y: Any, operator: Operator | None = None) -> np.ndarray:
        r"""Posterior means :math:`E[x \mid y_i]`, NumPy float32 ``(n, D)``.

        Exact for the Gaussian prior; for a diffusion prior, the average of
        ``n_transform_samples`` posterior samples (Monte Carlo error
        :math:`\propto 1/\sqrt{\text{n\_transform\_samples}}`), reproducible with
        ``random_state``. With ``operator=None`` and NaN in ``Y``, this imputes the missing
        entries.
        """
        Y_t, op = self._check_predict(Y, operator)
        prior = self.prior_
        if isinstance(prior, AnalyticPrior):
            return _float32(prior.posterior_mean(Y_t, op))
        return _float32(prior.posterior_mean(Y_t, op, self._predict_generator(None)))

    def score_samples(
        self, Y: Any, operator: Operator | None = None, return_std: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        r"""Log-evidences :math:`\log q(y_i)`, NumPy float32 ``(n,)``; with ``return_std``,
        also their Monte Carlo standard errors ``(n,)``.

        Exact for the Gaussian prior (standard error 0). For a diffusion prior, the
        importance-sampling estimate of :func:`diffem.em.evidence.importance_log_evidence`,

        .. math:: \log q(y) \approx \operatorname{logsumexp}_{k=1}^{K}\big[\log q(x_k)
            + \log p(y \mid x_k) - \log r(x_k \mid y)\big] - \log K,

        with ``K = n_score_samples`` proposals from the exact posterior of ``proposal_``
        (linearised for a nonlinear operator; covariance slightly inflated) and
        :math:`\log q(x)` from the probability-flow ODE solved relative to that Gaussian
        (``score_steps`` Heun steps; Hutchinson's trace estimator with two Rademacher probes
        and the Gaussian as control variate, exact for ``D <= 2``), plus the first-order bias
        correction :math:`\mathrm{se}^2/2`. It is consistent as ``K`` and ``score_steps``
        grow; noiseless measurements are given a noise std of ``1e-3 * sigma_data_``. The
        standard error is the delta-method estimate from the importance weights: the spread
        of repeated estimates, not the ODE's discretisation error. Cost per observation:
        ``2 * score_steps * K`` denoiser evaluations with two vector-Jacobian products each.
        """
        Y_t, op = self._check_predict(Y, operator)
        prior = self.prior_
        if isinstance(prior, AnalyticPrior):
            values = _float32(prior.log_evidence(Y_t, op))
            return (values, np.zeros_like(values)) if return_std else values
        values, std = prior.log_evidence(Y_t, op, self._predict_generator(None), return_std=True)
        return (_float32(values), _float32(std)) if return_std else _float32(values)

    def score(self, Y: Any, operator: Operator | None = None, *, y: Any = None) -> float:
        """Mean log-evidence of the observations, ``mean(score_samples(Y, operator))``;
        higher is better. ``y`` is a keyword alias of ``operator`` (see :meth:`fit`). Its
        Monte Carlo standard error is ``sqrt(sum(std**2)) / n`` with ``std`` from
        ``score_samples(Y, operator, return_std=True)``."""
        operator = _operator_alias(operator, y)
        return float(np.mean(self.score_samples(Y, operator), dtype=np.float64))

    # ------------------------------------------------------------------ persistence
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: never alter the live estimator
        tensors = {name: state.pop(name) for name in _TORCH_ATTRIBUTES if name in state}
        if tensors:
            state["_torch_state"] = dumps(tensors)
            state["_saved_device"] = str(state.get("device_", "cpu"))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_torch_state", None)
        saved = state.pop("_saved_device", "cpu")
        if blob is not None:
            state.update(loads(blob))
            device = loadable_device(saved)
            if device != torch.device(saved):
                warnings.warn(
                    f"this DiffusionPriorEM was fitted on {saved}, which is unavailable; it "
                    "was loaded on the CPU.",
                    UserWarning,
                    stacklevel=2,
                )
                state["device_"] = device
        super().__setstate__(state)
        if blob is not None and hasattr(self, "device_"):
            self._move_to(torch.device(self.device_))


# The fit's private state (dropped after fit): the network being trained, the warm-up sampler,
# the E-step samples for the next M-step, the evidence and convergence bookkeeping.
_PRIVATE_STATE = (
    "_network",
    "_warmup_sampler",
    "_e_samples",
    "_last_evidence",
    "_evidence_rows",
    "_best",
    "_no_change",
    "_initial_stats",
    "_initial_lr",
)
# What a checkpoint holds.
_STATE = (
    "gaussian_prior_",
    "init_prior_",
    "proposal_",
    "sigma_data_",
    "sampler_",
    "evidence_sampler_",
    "denoiser_",
    "history_",
    "n_iter_",
    "device_",
    "n_features_in_",
    "initial_log_evidence_",
    "initial_exact_log_evidence_",
    "best_iteration_",
    "converged_",
    *_PRIVATE_STATE,
)


def _prior_variances(prior: GaussianPrior) -> Tensor:
    if prior.factor is None:
        return prior.covariance.double().diagonal()
    return (prior.factor.double() ** 2).sum(-1) + prior.diag.double()


def _evidence_rows(n: int, rows: int | None, seed: int) -> Tensor:
    """The fixed observations of the evidence estimates: ``rows`` of the ``n`` at random (all
    of them when ``rows`` is ``None`` or at least ``n``)."""
    if rows is None or n <= rows:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(_sub_seed(seed, 0, 3))
    return torch.randperm(n, generator=generator)[:rows].sort().values


def _sample_stats(samples: Tensor) -> dict[str, float]:
    """Mean and per-feature standard deviation (averaged) of E-step samples ``(n, S, D)``."""
    flat = samples.reshape(-1, samples.shape[-1])
    std = float(flat.std(dim=0).mean()) if len(flat) > 1 else 0.0
    return {"sample_mean": float(flat.mean()), "sample_std": std}


def _diagnostics(sampler: Any) -> dict[str, float]:
    diagnostics = getattr(sampler, "diagnostics_", None) or {}
    return {
        key: float(value)
        for key, value in diagnostics.items()
        if isinstance(value, (int, float, np.floating, np.integer))
    }


def _operator_alias(operator: Any, y: Any) -> Any:
    """The operator given either positionally or as the keyword ``y``."""
    if y is None:
        return operator
    if operator is not None:
        raise TypeError("pass the operator once: either as operator or as the keyword y.")
    return y


def _initialized(net: Any) -> bool:
    return bool(getattr(net, "initialized_", False))


def _float32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
