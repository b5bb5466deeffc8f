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

never decreases the mean log-evidence. With a diffusion model, the E-step draws one sample
:math:`x_i \sim q_{\theta_k}(x \mid y_i)` per observation with a posterior sampler (MMPS by
default), and the M-step trains the denoiser on these samples by denoising score matching,
warm-started from :math:`\theta_k`. The EM starts from a Gaussian prior fitted by closed-form EM
(:func:`diffem.priors.fit_gaussian`), which is also the denoiser of the first E-step.
"""

from __future__ import annotations

import copy
import io
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted
from skorch.callbacks import Callback
from torch import Tensor

from diffem._device import loadable_device, resolve_device
from diffem._random import draw_seed as _seed
from diffem._random import torch_generator as _generator
from diffem._validation import check_int
from diffem.denoisers import DivergenceError, MLPDenoiser
from diffem.em.checkpoint import find_checkpoint, fingerprint, save_checkpoint
from diffem.em.distributed import DataParallel, data_parallel_training, resolve_data_parallel
from diffem.em.evidence import importance_log_evidence, moment_matched_gaussian
from diffem.em.validation import check_observations, check_params, resolve_operator
from diffem.operators import Operator
from diffem.priors import GaussianPrior, fit_gaussian
from diffem.samplers import MMPS, Unconditional

__all__ = ["DiffusionPriorEM", "default_sampler"]

# Fitted attributes holding tensors; pickled through torch.save so that they can be mapped to
# the CPU when CUDA is unavailable at load time.
_TORCH_ATTRIBUTES = ("denoiser_", "sampler_", "gaussian_prior_", "proposal_")

# Largest dimension for which the cheap evidence proxy of the history is computed.
_PROXY_MAX_DIM = 64
_PROXY_MAX_ROWS = 2048


def default_sampler() -> MMPS:
    r"""The E-step sampler of ``DiffusionPriorEM(sampler=None)``:
    ``MMPS(steps=64, cg_iter=3, solver="dpmpp_2m", warm_start=True)``, one forward pass and
    four vector-Jacobian products per step. With an exact Gaussian denoiser its means are
    unbiased and its covariance error is within 1.2x of the sampling floor; the residual guard
    (:func:`diffem.samplers.guidance.residual_guard`) keeps the accurate solve from throwing
    samples off the data with a learned denoiser."""
    return MMPS(steps=64, cg_iter=3, solver="dpmpp_2m", warm_start=True)


class _EpochProgress(Callback):
    """A skorch callback showing a tqdm bar over the epochs of one M-step (``verbose >= 2``)."""

    def __init__(self, desc: str = "M-step") -> None:
        self.desc = desc

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar_ = tqdm(total=int(net.max_epochs), desc=self.desc, leave=False)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        bar = getattr(self, "bar_", None)
        if bar is not None:
            loss = net.history[-1].get("train_loss", float("nan"))
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.update(1)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        bar = getattr(self, "bar_", None)
        if bar is not None:
            bar.close()
        self.bar_ = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["bar_"] = None  # a progress bar is not picklable (and not state)
        return state


class _InterruptFlag:
    """Records SIGINT during ``fit``: skorch swallows ``KeyboardInterrupt`` inside training, so
    the estimator installs a handler that notes it before raising it as usual."""

    def __init__(self) -> None:
        self.raised = False

    @contextmanager
    def watch(self) -> Iterator[_InterruptFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            self.raised = True
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # pragma: no cover - not the main interpreter
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _sub_seed(base: int, *keys: int) -> int:
    """Independent seeds per EM iteration and stage, from one base seed."""
    return int(np.random.SeedSequence([base, *keys]).generate_state(1)[0])


class DiffusionPriorEM(TransformerMixin, BaseEstimator):
    r"""Learn a diffusion-model prior from corrupted observations by expectation-maximisation.

    Observations are :math:`y_i = A_i x_i + e_i` with linear operators :math:`A_i` and diagonal
    Gaussian noise (a :class:`diffem.operators.Operator`, or ``None`` for direct observations
    with missing entries marked NaN), or :math:`y_i = f(x_i; \theta_i) + e_i` with a
    differentiable :class:`diffem.operators.Nonlinear` operator: the samplers linearise it at
    each step's denoiser estimate, and the Gaussian initialisation, its first E-step and the
    proposal of :meth:`score_samples` use its linearisation about each posterior mean
    (:mod:`diffem.priors.linearize`). The fit starts from a Gaussian prior (closed-form EM,
    :func:`diffem.priors.fit_gaussian`) and runs ``n_iter`` EM iterations (Rozet et al., 2024,
    eqs. (5)-(6)):

    .. math::
        \text{E-step: } x_i \sim q_{\theta_k}(x \mid y_i) \text{ (posterior sampler)}, \qquad
        \text{M-step: } \theta_{k+1} = \arg\min_\theta \frac1n \sum_i
        E_{\sigma, z}\big[\lambda(\sigma) \lVert D_\theta(x_i + \sigma z, \sigma) - x_i
        \rVert^2\big],

    the M-step warm-started from :math:`\theta_k` (``denoiser.partial_fit``). The first E-step
    uses the Gaussian prior as the denoiser.

    Parameters
    ----------
    denoiser : diffem.denoisers.Denoiser or None
        The learned denoiser (unfitted; the estimator fits a clone). ``None``:
        ``MLPDenoiser()``. Its ``sigma_data`` is set from the scale of the data (the root mean
        square of the Gaussian initialisation), its ``device`` to the estimator's, and its
        ``random_state`` (when ``None``) from ``random_state``.
    sampler : diffem.samplers.PosteriorSampler or None
        The E-step's posterior sampler (cloned) for the iterations whose prior is a diffusion
        model (the first E-step samples the Gaussian initialisation's exact posterior).
        ``None``: :func:`default_sampler`, MMPS with 64 DPM-Solver++(2M) steps and three
        warm-started CG iterations, which reproduces exact Gaussian posteriors at the sampling
        floor (the paper's ``MMPS()``, 64 ancestral steps and one cold CG iteration, is 1.4-3.4x
        above it); ``diffem.samplers.SMC()`` is asymptotically exact at ``particles`` times
        the cost. Its ``sigma_min`` and
        ``sigma_max`` are set to the denoiser's and its ``sigma_data`` (if any) to the data
        scale, so that the schedules agree.
    n_iter : int, default=8
        EM iterations. ``0`` gives the Gaussian prior (then every method is exact).
    noise_std : float, default=0.0
        Observation noise std when ``operator=None``.
    device : {"auto", "cpu", "cuda", ...} or torch.device, default="auto"
        Where sampling and training run; ``"auto"`` picks CUDA when available. Data stay on
        the CPU and move to the device in chunks of ``batch_size``.
    random_state : int, numpy.random.RandomState or None
        Makes ``fit``, ``sample``, ``sample_posterior``, ``transform`` and ``score_samples``
        reproducible on the same device (a method's own ``random_state`` overrides it).
    verbose : int, default=0
        ``1``: a progress bar over EM iterations (with the loss and timings); ``2``: also over
        the sampling steps and training epochs.
    gaussian_iter : int, default=16
        Iterations of the closed-form Gaussian EM of the initialisation.
    gaussian_rank : int or None, default=None
        Rank of the Gaussian initialisation's covariance (PPCA-style low rank plus diagonal),
        for large dimensions; ``None`` is a full covariance.
    n_transform_samples : int, default=16
        Posterior samples averaged by :meth:`transform` for a diffusion prior.
    n_score_samples : int, default=16
        Importance samples ``K`` per observation of :meth:`score_samples` for a diffusion prior:
        its cost is proportional, its standard error falls as :math:`1/\sqrt{K}`.
    score_steps : int, default=8
        Heun steps of the probability-flow ODE that gives :math:`\log q(x)` in
        :meth:`score_samples` (cost proportional; error :math:`O(1/\text{steps}^2)`).
    batch_size : int, default=4096
        Observations per E-step chunk (bounds device memory), and proposals per ODE batch in
        :meth:`score_samples`.
    checkpoint_dir : str, path or None, default=None
        If set, the state is saved there after every EM iteration, and ``fit`` resumes from
        the latest compatible checkpoint (same hyper-parameters and data).
    callback : callable or None, default=None
        ``callback(estimator, record)`` is called after the Gaussian initialisation (with
        ``record = {"iteration": 0}``) and after every completed EM iteration (with that
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
    denoiser_ : Denoiser or GaussianPrior
        The learned prior's denoiser :math:`E[x \mid x_t]`; the Gaussian prior when
        ``n_iter_ == 0``.
    sampler_ : PosteriorSampler
        The E-step sampler, with the schedule used.
    gaussian_prior_ : GaussianPrior
        The Gaussian initialisation.
    proposal_ : GaussianPrior
        The Gaussian moment-matched to the last E-step's samples (the training data of the
        final M-step; Ledoit-Wolf covariance): its posteriors are the importance proposals of
        :meth:`score_samples`, and its flow the reference of the probability-flow ODE. Absent
        when ``n_iter_ == 0``.
    history_ : list of dict
        One record per completed EM iteration: ``iteration``, ``e_step_seconds``,
        ``m_step_seconds``, ``train_loss`` (last epoch), ``n_epochs``, the sampler's
        diagnostics prefixed ``sampler_``, ``sample_mean`` and ``sample_std`` (of the E-step
        samples, averaged over features) and, for ``D <= 64``, ``gaussian_log_evidence``: the
        mean log-evidence of the observations under the Gaussian moment-matched to the E-step
        samples (a cheap proxy of the evidence that EM increases).
    n_iter_ : int
        Completed EM iterations.
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
        n_iter: int = 8,
        noise_std: float = 0.0,
        device: str | torch.device = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        *,
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
        d = op.n_features
        self._reset_fitted()
        # distributed hook: the launcher's process group (None in a single process)
        group = resolve_data_parallel(self.distributed, device)
        device = device if group is None else group.device

        base_seed = _seed(self.random_state)
        if group is not None:
            base_seed = group.broadcast_int(base_seed)  # the same EM on every rank
        key = None
        payload = None
        if self.checkpoint_dir is not None:
            key = fingerprint(self.get_params(deep=True), Y_np, op)
            payload = find_checkpoint(self.checkpoint_dir, key, int(self.n_iter))
        if payload is not None:
            self._restore_payload(payload, device)
            base_seed = int(payload["seed"])
            self.resumed_from_ = int(payload["iteration"])
        else:
            self._initialise(Y_t, op, device, base_seed)
        self.n_features_in_ = d
        if self.callback is not None and payload is None:
            self.callback(self, {"iteration": 0})

        start = self.n_iter_
        flag = _InterruptFlag()
        main = group is None or group.is_main
        bar = self._em_progress(start) if main else None
        self._data_parallel = group  # distributed hook, read by the E- and M-steps
        try:
            with flag.watch():
                for k in range(start, int(self.n_iter)):
                    if not self._em_iteration(k, Y_t, op, base_seed, flag):
                        break
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(self._postfix(self.history_[-1]))
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
            del self._data_parallel
            if bar is not None:
                bar.close()
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
            if (name.endswith("_") and not name.startswith("__")) or name == "_network":
                delattr(self, name)
        self.interrupted_ = False
        self.resumed_from_ = None

    def _initialise(self, Y: Tensor, op: Operator, device: torch.device, base_seed: int) -> None:
        """Gaussian initialisation, cloned denoiser and sampler with consistent schedules."""
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
        variance = self._prior_variances(self.gaussian_prior_)
        scale = math.sqrt(float(variance.mean() + (mean**2).mean()))
        self.sigma_data_ = scale if math.isfinite(scale) and scale > 0 else 1.0

        denoiser = MLPDenoiser() if self.denoiser is None else clone(self.denoiser)
        sampler = default_sampler() if self.sampler is None else clone(self.sampler)
        params = denoiser.get_params(deep=False)
        new: dict[str, Any] = {}
        if "sigma_data" in params:
            new["sigma_data"] = self.sigma_data_
        if "device" in params:
            new["device"] = str(device)
        if params.get("random_state", 0) is None:
            new["random_state"] = _sub_seed(base_seed, 0, 1)
        if self.verbose >= 2 and "callbacks" in params:
            callbacks = list(params["callbacks"] or [])
            new["callbacks"] = [*callbacks, ("em_progress", _EpochProgress())]
        denoiser.set_params(**new)
        sigma_min = float(getattr(denoiser, "sigma_min", getattr(sampler, "sigma_min", 1e-3)))
        sigma_max = float(getattr(denoiser, "sigma_max", getattr(sampler, "sigma_max", 1e2)))
        if int(self.n_iter) > 0 and sigma_max < 10 * self.sigma_data_:
            warnings.warn(
                f"the data scale ({self.sigma_data_:.3g}) is not small compared to the "
                f"denoiser's sigma_max ({sigma_max:.3g}); standardise the data or raise "
                "denoiser__sigma_max.",
                stacklevel=3,
            )
        sampler_params = sampler.get_params(deep=False)
        new = {"sigma_min": sigma_min, "sigma_max": sigma_max}
        if "sigma_data" in sampler_params:
            new["sigma_data"] = self.sigma_data_
        if "verbose" in sampler_params:
            new["verbose"] = int(self.verbose >= 2)
        sampler.set_params(**{k: v for k, v in new.items() if k in sampler_params})
        self.sampler_ = sampler
        self._network = denoiser  # the network being trained (unfitted until the first M-step)
        self.denoiser_ = self.gaussian_prior_
        self.history_ = []
        self.n_iter_ = 0
        self.device_ = device

    @staticmethod
    def _prior_variances(prior: GaussianPrior) -> Tensor:
        if prior.factor is None:
            return prior.covariance.double().diagonal()
        return (prior.factor.double() ** 2).sum(-1) + prior.diag.double()

    def _em_iteration(
        self, k: int, Y: Tensor, op: Operator, base_seed: int, flag: _InterruptFlag
    ) -> bool:
        """Runs EM iteration ``k`` (0-based); returns ``False`` if it was interrupted."""
        network = self._network
        backup = copy.deepcopy(network) if self.n_iter_ > 0 else None
        record: dict[str, Any] = {"iteration": k + 1}
        try:
            # E-step: x_i ~ q_k(x | y_i), one sample per observation; exact (Matheron's rule)
            # while the prior is the Gaussian initialisation.
            tic = time.perf_counter()
            generator = _generator(_sub_seed(base_seed, k + 1, 0), self.device_)
            X = self._sharded_e_step(Y, op, generator)
            record["e_step_seconds"] = time.perf_counter() - tic
            record["e_step_exact"] = self.n_iter_ == 0 and op.is_linear  # else linearised
            if not bool(torch.isfinite(X).all()):
                raise DivergenceError(
                    f"the E-step of EM iteration {k + 1} produced non-finite samples."
                )
            if self.n_iter_ > 0:
                diagnostics = self._diagnostics()
                record.update({f"sampler_{key}": value for key, value in diagnostics.items()})
            record["sample_mean"] = float(X.mean())
            record["sample_std"] = float(X.std(dim=0).mean()) if len(X) > 1 else 0.0
            # M-step: denoising score matching on the samples, warm-started.
            tic = time.perf_counter()
            epochs_before = len(network.history) if _initialized(network) else 0
            self._partial_fit(network, X, _sub_seed(base_seed, k + 1, 2))
            record["m_step_seconds"] = time.perf_counter() - tic
            if flag.raised:  # skorch stopped training on Ctrl-C and returned normally
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._rollback(backup)
            self.interrupted_ = True
            warnings.warn(
                f"DiffusionPriorEM.fit was interrupted during EM iteration {k + 1}; the "
                f"estimator holds the prior of iteration {self.n_iter_} "
                f"({'Gaussian' if self.n_iter_ == 0 else 'diffusion'}).",
                UserWarning,
                stacklevel=3,
            )
            return False
        except DivergenceError as error:
            self._rollback(backup)
            raise DivergenceError(
                f"DiffusionPriorEM diverged at EM iteration {k + 1}: {error} The estimator was "
                f"restored to iteration {self.n_iter_} and is usable; refit with a smaller "
                "denoiser__lr or more sampler steps."
            ) from error
        history = network.history
        record["n_epochs"] = len(history) - epochs_before
        record["train_loss"] = float(history[-1]["train_loss"]) if len(history) else math.nan
        record["gaussian_log_evidence"] = self._evidence_proxy(X, Y, op)
        self.denoiser_ = network
        # score hook: the new prior was trained on X; its moment-matched Gaussian's posteriors
        # are the importance proposals of score_samples
        self.proposal_ = moment_matched_gaussian(X)
        self.n_iter_ = k + 1
        self.history_.append(record)
        return True

    def _rollback(self, backup: Any) -> None:
        """Restores the network of the last completed iteration."""
        if backup is not None:
            self._network = backup
            self.denoiser_ = backup
        elif self.n_iter_ == 0:
            # nothing trained yet: a fresh, unfitted clone for a later fit
            self._network = clone(self._network)
            self.denoiser_ = self.gaussian_prior_

    def _diagnostics(self) -> dict[str, float]:
        diagnostics = getattr(self.sampler_, "diagnostics_", None) or {}
        return {
            key: float(value)
            for key, value in diagnostics.items()
            if isinstance(value, (int, float, np.floating, np.integer))
        }

    def _evidence_proxy(self, X: Tensor, Y: Tensor, op: Operator) -> float:
        """Mean log-evidence of ``Y`` under the Gaussian moment-matched to the samples ``X``."""
        n, d = X.shape
        if d > _PROXY_MAX_DIM or n < 2:
            return math.nan
        X64 = X.double()
        mean = X64.mean(0)
        cov = torch.cov(X64.T).reshape(d, d)
        cov = cov + 1e-6 * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(
            d, dtype=torch.float64
        )
        rows = min(n, _PROXY_MAX_ROWS)
        try:
            prior = GaussianPrior(mean, cov)
            return float(prior._log_evidence_torch(Y[:rows], op[:rows]).mean())
        except (ValueError, RuntimeError):
            return math.nan

    def _posterior_samples(
        self, denoiser: Any, Y: Tensor, op: Operator, generator: torch.Generator
    ) -> Tensor:
        """One sample per row of ``Y`` with ``sampler_``, in chunks of ``batch_size`` on the
        device; returns a float32 CPU tensor ``(n, D)``."""
        n = len(Y)
        step = int(self.batch_size)
        out = []
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            y = Y[rows].to(device=self.device_, dtype=torch.float32)
            sub = op[rows].to(device=self.device_, dtype=torch.float32)
            x = self.sampler_.sample(denoiser, y, sub, generator=generator)
            out.append(x.detach().to("cpu", torch.float32))
        return torch.cat(out)

    def _e_step(self, Y: Tensor, op: Operator, generator: torch.Generator) -> Tensor:
        """One sample of the current prior's posterior per row of ``Y``: exact for the Gaussian
        initialisation, with ``sampler_`` for a diffusion prior; float32 CPU ``(n, D)``."""
        if self.n_iter_ == 0:
            return self._exact_posterior_samples(Y, op, generator)
        return self._posterior_samples(self._network, Y, op, generator)

    def _sharded_e_step(self, Y: Tensor, op: Operator, generator: torch.Generator) -> Tensor:
        """Distributed hook: :meth:`_e_step` on this rank's shard of the rows, all-gathered,
        so that every rank holds all samples ``(n, D)``; :meth:`_e_step` in one process."""
        group: DataParallel | None = getattr(self, "_data_parallel", None)
        if group is None:
            return self._e_step(Y, op, generator)
        rows = group.shard(len(Y))
        generator = group.rank_generator(generator)
        if rows.stop > rows.start:
            X = self._e_step(Y[rows], op[rows], generator)
        else:  # more ranks than observations
            X = torch.zeros(0, op.n_features)
        return group.all_gather_rows(X, len(Y))

    def _partial_fit(self, network: Any, X: Tensor, seed: int) -> None:
        """``network.partial_fit(X)``; distributed hook: data-parallel on this rank's part of
        the samples (equal sizes on every rank, a random partition drawn from ``seed``)."""
        group: DataParallel | None = getattr(self, "_data_parallel", None)
        if group is None:
            network.partial_fit(X)
            return
        with data_parallel_training(network, group):
            network.partial_fit(X[group.m_step_rows(len(X), seed)])

    def _exact_posterior_samples(
        self, Y: Tensor, op: Operator, generator: torch.Generator
    ) -> Tensor:
        """One exact sample of the Gaussian initialisation's posterior per row of ``Y``, in
        chunks of ``batch_size`` on the device; a float32 CPU tensor ``(n, D)``."""
        prior = self.gaussian_prior_.to(self.device_)
        step, out = int(self.batch_size), []
        for start in range(0, len(Y), step):
            rows = slice(start, min(len(Y), start + step))
            y, sub = Y[rows].to(self.device_), op[rows].to(self.device_)
            x = prior._sample_posterior_torch(y, sub, 1, generator)[:, 0]
            out.append(x.detach().to("cpu", torch.float32))
        return torch.cat(out)

    def _save_checkpoint(self, key: str, base_seed: int) -> None:
        state = {name: getattr(self, name) for name in self._state_names()}
        save_checkpoint(
            self.checkpoint_dir,
            self.n_iter_,
            {"fingerprint": key, "seed": base_seed, "state": _dumps(state)},
        )

    def _restore_payload(self, payload: dict[str, Any], device: torch.device) -> None:
        state = _loads(payload["state"])
        for name, value in state.items():
            setattr(self, name, value)
        self._move_to(device)

    @staticmethod
    def _state_names() -> tuple[str, ...]:
        return (
            "gaussian_prior_",
            "proposal_",
            "sigma_data_",
            "sampler_",
            "_network",
            "denoiser_",
            "history_",
            "n_iter_",
            "device_",
        )

    def _move_to(self, device: torch.device) -> None:
        """Puts the fitted state on ``device`` (the network's weights and ``device`` param)."""
        self.device_ = device
        network = getattr(self, "_network", None)
        if network is not None and hasattr(network, "to"):
            network.to(device)

    def _em_progress(self, start: int) -> Any:
        if not self.verbose or int(self.n_iter) <= start:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=int(self.n_iter), initial=start, desc="DiffusionPriorEM", unit="iter")

    @staticmethod
    def _postfix(record: dict[str, Any]) -> dict[str, str]:
        return {
            "loss": f"{record.get('train_loss', math.nan):.4g}",
            "E": f"{record.get('e_step_seconds', 0.0):.1f}s",
            "M": f"{record.get('m_step_seconds', 0.0):.1f}s",
        }

    # ------------------------------------------------------------------ prediction helpers
    @property
    def _is_diffusion(self) -> bool:
        return self.n_iter_ > 0

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

    # ------------------------------------------------------------------ public methods
    def sample(self, n_samples: int = 1, random_state: Any = None) -> np.ndarray:
        """Samples of the learned prior, NumPy float32 ``(n_samples, D)``.

        The diffusion prior is sampled with :class:`~diffem.samplers.Unconditional` using the
        E-step sampler's ``steps``, ``eta``, ``solver`` and schedule. ``random_state`` defaults
        to the estimator's.
        """
        check_is_fitted(self, ("denoiser_", "gaussian_prior_"))
        n_samples = check_int(n_samples, "n_samples", 1)
        generator = self._predict_generator(random_state)
        if not self._is_diffusion:
            prior = self.gaussian_prior_.to(self.device_)
            return _numpy(prior._sample_torch(n_samples, generator))
        params = self.sampler_.get_params(deep=False)
        sampler = Unconditional(
            steps=int(params.get("steps", 64)),
            eta=float(params.get("eta", 1.0)),
            solver=str(params.get("solver", "ancestral")),
            sigma_min=float(params["sigma_min"]),
            sigma_max=float(params["sigma_max"]),
            batch_size=int(params.get("batch_size", self.batch_size)),
            verbose=int(self.verbose >= 2),
        )
        out = []
        for start in range(0, n_samples, int(self.batch_size)):
            size = min(int(self.batch_size), n_samples - start)
            x = sampler.sample(
                self.denoiser_,
                size,
                self.n_features_in_,
                generator,
                dtype=torch.float32,
                device=self.device_,
            )
            out.append(x.to("cpu"))
        return _numpy(torch.cat(out))

    def sample_posterior(
        self,
        Y: Any,
        operator: Operator | None = None,
        n_samples: int = 1,
        random_state: Any = None,
    ) -> np.ndarray:
        r"""Samples of :math:`q(x \mid y_i)`, NumPy float32 ``(n, n_samples, D)``.

        Exact for the Gaussian prior (``n_iter_ == 0``); with ``sampler_`` for a diffusion
        prior. ``random_state`` defaults to the estimator's.
        """
        Y_t, op = self._check_predict(Y, operator)
        n_samples = check_int(n_samples, "n_samples", 1)
        generator = self._predict_generator(random_state)
        return _numpy(self._sample_posterior_torch(Y_t, op, n_samples, generator))

    def _sample_posterior_torch(
        self, Y: Tensor, op: Operator, n_samples: int, generator: torch.Generator
    ) -> Tensor:
        n, d = len(Y), self.n_features_in_
        if not self._is_diffusion:
            prior = self.gaussian_prior_.to(self.device_)
            return prior._sample_posterior_torch(
                Y.to(self.device_), op.to(self.device_), n_samples, generator
            ).to("cpu", torch.float32)
        rows = torch.arange(n).repeat_interleave(n_samples)
        x = self._posterior_samples(self.denoiser_, Y[rows], op[rows], generator)
        return x.reshape(n, n_samples, d)

    def transform(self, Y: Any, operator: Operator | None = None) -> np.ndarray:
        r"""Posterior means :math:`E[x \mid y_i]`, NumPy float32 ``(n, D)``.

        Exact for the Gaussian prior; for a diffusion prior, the average of
        ``n_transform_samples`` posterior samples (Monte Carlo error
        :math:`\propto 1/\sqrt{\text{n\_transform\_samples}}`), reproducible with
        ``random_state``. With ``operator=None`` and NaN in ``Y``, this imputes the missing
        entries.
        """
        Y_t, op = self._check_predict(Y, operator)
        if not self._is_diffusion:
            prior = self.gaussian_prior_.to(self.device_)
            return _numpy(prior._posterior_mean_torch(Y_t.to(self.device_), op.to(self.device_)))
        generator = self._predict_generator(None)
        samples = self._sample_posterior_torch(Y_t, op, int(self.n_transform_samples), generator)
        return _numpy(samples.mean(1))

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
        (linearised for a nonlinear operator; covariance slightly inflated) and :math:`\log
        q(x)` from the probability-flow ODE solved relative to that Gaussian (``score_steps``
        Heun steps; Hutchinson's trace estimator with two Rademacher probes and the Gaussian as
        control variate, exact for ``D <= 2``), plus the first-order bias correction
        :math:`\mathrm{se}^2/2`. It is consistent as ``K`` and ``score_steps`` grow; noiseless
        measurements are given a noise std of ``1e-3 * sigma_data_``. The standard error is the
        delta-method estimate from the importance weights: the spread of repeated estimates, not
        the ODE's discretisation error. Cost per observation: ``2 * score_steps * K`` denoiser
        evaluations with two vector-Jacobian products each (at the defaults, 256 evaluations: a
        small fraction of ``fit``'s E-steps and M-steps; see
        ``benchmarks/results/score_speed.md``).
        """
        Y_t, op = self._check_predict(Y, operator)
        if not self._is_diffusion:
            prior = self.gaussian_prior_.to(self.device_)
            values = _numpy(prior._log_evidence_torch(Y_t.to(self.device_), op.to(self.device_)))
            return (values, np.zeros_like(values)) if return_std else values
        generator = self._predict_generator(None)
        params = self.sampler_.get_params(deep=False)
        evidence = importance_log_evidence(
            self.denoiser_,
            Y_t,
            op,
            getattr(self, "proposal_", self.gaussian_prior_),
            sigma_min=float(getattr(self.denoiser_, "sigma_min", params["sigma_min"])),
            sigma_max=float(getattr(self.denoiser_, "sigma_max", params["sigma_max"])),
            n_samples=int(self.n_score_samples),
            steps=int(self.score_steps),
            min_noise_std=1e-3 * float(self.sigma_data_),
            batch_size=int(self.batch_size),
            device=self.device_,
            generator=generator,
        )
        values = _numpy(evidence.log_evidence)
        return (values, _numpy(evidence.std)) if return_std else values

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
        tensors = {
            name: state.pop(name) for name in (*_TORCH_ATTRIBUTES, "_network") if name in state
        }
        if tensors:
            state["_torch_state"] = _dumps(tensors)
            state["_saved_device"] = str(state.get("device_", "cpu"))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_torch_state", None)
        saved = state.pop("_saved_device", "cpu")
        if blob is not None:
            state.update(_loads(blob))
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


def _operator_alias(operator: Any, y: Any) -> Any:
    """The operator given either positionally or as the keyword ``y``."""
    if y is None:
        return operator
    if operator is not None:
        raise TypeError("pass the operator once: either as operator or as the keyword y.")
    return y


def _initialized(net: Any) -> bool:
    return bool(getattr(net, "initialized_", False))


def _map_location() -> str | None:
    """``"cpu"`` when CUDA is unavailable (so CUDA tensors load on the CPU), else ``None``."""
    return None if torch.cuda.is_available() else "cpu"


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(blob: bytes) -> Any:
    from skorch.exceptions import DeviceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeviceWarning)
        return torch.load(io.BytesIO(blob), map_location=_map_location(), weights_only=False)


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()
