r"""Learned denoisers trained by denoising score matching through skorch.

A :class:`Denoiser` is a :class:`skorch.NeuralNet` whose module is the network
:math:`F_\theta` of the EDM preconditioning (Karras et al., 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models"):

.. math::
    D_\theta(x_t, \sigma) = c_{\text{skip}}(\sigma) x_t + c_{\text{out}}(\sigma)
    F_\theta\big(c_{\text{in}}(\sigma) x_t, c_{\text{noise}}(\sigma)\big)
    \approx E[x \mid x_t], \qquad x_t = x + \sigma z, \; z \sim \mathcal{N}(0, I).

It is trained on clean samples :math:`x` by denoising score matching (Vincent, 2011) with the
EDM loss weighting,

.. math::
    \mathcal{L}(\theta) = E_{x, \sigma, z}\Big[\lambda(\sigma) \,
    \lVert D_\theta(x + \sigma z, \sigma) - x \rVert^2\Big], \qquad
    \lambda(\sigma) = 1 / c_{\text{out}}(\sigma)^2,

with :math:`\log \sigma \sim \mathcal{U}(\log \sigma_{\min}, \log \sigma_{\max})` per sample
(the training noise levels of Rozet et al., 2024), or a normal :math:`\log \sigma \sim
\mathcal{N}(P_{\text{mean}}, P_{\text{std}}^2)` truncated to that range (Karras et al., 2022,
sec. 5), which spends the training on the middle of the schedule. The minimiser is the
Tweedie posterior mean :math:`E[x \mid x_t]`, whose Jacobian gives :math:`\text{Cov}[x \mid
x_t] = \sigma^2 \nabla_{x_t} E[x \mid x_t]`, which is what the posterior samplers use.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from skorch import NeuralNet
from skorch.dataset import unpack_data
from skorch.utils import to_tensor
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from .._random import torch_generator
from .._validation import as_float_tensor, check_finite, check_int, check_number
from ..schedule import EDMPreconditioning, VESchedule
from .training import (
    CosineSchedule,
    GradientNormClipping,
    TensorBatches,
    WarmupEMA,
    fast_optimizer_defaults,
)

__all__ = ["Denoiser", "DivergenceError", "WeightedMSELoss"]

_LR_SCHEDULES = ("cosine", "constant")
_SIGMA_DISTRIBUTIONS = ("log_uniform", "log_normal")


class DivergenceError(FloatingPointError, RuntimeError):
    """Training produced a non-finite loss or gradient.

    Raised by :meth:`Denoiser.fit` and :meth:`Denoiser.partial_fit` after the weights, the
    EMA weights and the optimizer state have been restored to their values at the start of
    the failing epoch, so the net is left usable.
    """


class WeightedMSELoss(nn.Module):
    r"""Per-sample weighted squared error, averaged over samples and features.

    .. math:: \ell = \frac{1}{B D} \sum_{i=1}^{B} w_i \lVert \hat{x}_i - x_i \rVert^2

    Shapes
    ------
    ``forward(y_pred (B, D), y_true (B, D), weight (B,)) -> ()``.
    """

    def forward(self, y_pred: Tensor, y_true: Tensor, weight: Tensor) -> Tensor:
        err = (y_pred - y_true).square().flatten(1).mean(dim=1)
        return (weight * err).mean()


def _module_defaults(module: Any, exclude: tuple[str, ...]) -> dict[str, Any]:
    """Keyword defaults of a module class, as ``module__name`` entries."""
    out: dict[str, Any] = {}
    for name, p in inspect.signature(module).parameters.items():
        if name in exclude or p.default is inspect.Parameter.empty:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[f"module__{name}"] = p.default
    return out


def _cloned(state: Any) -> Any:
    """A copy of a (nested dict/list) state dict with its tensors cloned."""
    # copy.deepcopy does the same 4x to 5x slower on the default MLP's states (docs/benchmarks.md)
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _cloned(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_cloned(value) for value in state]
    return copy.deepcopy(state)


class Denoiser(NeuralNet):
    r"""Base class of the learned denoisers: a skorch ``NeuralNet`` trained by EDM-weighted
    denoising score matching, and a callable ``net(x_t, sigma) -> E[x | x_t]``.

    Parameters
    ----------
    module : torch.nn.Module class or instance
        The network :math:`F_\theta`, called as ``module(x (B, D), c_noise (B,)) -> (B, D)``.
        Its constructor receives ``features=D`` (inferred from ``X`` at fit unless
        ``module__features`` is given) and every ``module__*`` parameter.
    criterion : torch.nn.Module class
        Called as ``criterion(D(x_t, sigma), x, lambda(sigma))``; default
        :class:`WeightedMSELoss` (the EDM loss, averaged over samples and features).
    optimizer : torch.optim.Optimizer class
        Default :class:`torch.optim.AdamW`; ``optimizer__weight_decay`` etc. are passed on.
    lr : float
        Peak learning rate.
    max_epochs : int
        Epochs (passes over ``X``) per :meth:`fit` or :meth:`partial_fit` call.
    batch_size : int
        Mini-batch size (also used by :meth:`loss` and :meth:`predict`).
    train_split : callable or None
        skorch's validation split; ``None`` (default) trains on all of ``X``. With a split,
        ``valid_loss`` is the denoising loss on the held-out part.
    callbacks : list or None
        skorch callbacks, e.g. ``ProgressBar()``, ``EarlyStopping(monitor="train_loss")``,
        ``Checkpoint(monitor="train_loss_best")``.
    sigma_min, sigma_max : float
        Range of the training noise levels (:class:`~diffem.schedule.VESchedule`).
    sigma_distribution : {"log_uniform", "log_normal"}
        Distribution of the training noise levels: :math:`\log \sigma` uniform on
        :math:`[\log \sigma_{\min}, \log \sigma_{\max}]`, or normal with mean
        ``log_sigma_mean`` and standard deviation ``log_sigma_std`` truncated to it.
    log_sigma_mean : float or None
        :math:`P_{\text{mean}}` of ``"log_normal"``; ``None`` is the middle of the schedule,
        :math:`(\log \sigma_{\min} + \log \sigma_{\max}) / 2`.
    log_sigma_std : float
        :math:`P_{\text{std}}` of ``"log_normal"``.
    sigma_data : float
        Data scale of the EDM preconditioning (:class:`~diffem.schedule.EDMPreconditioning`).
    ema_decay : float or None
        Decay of an exponential moving average of the weights (torch's
        :class:`~torch.optim.swa_utils.AveragedModel`), updated after every optimizer step
        with the warm-up :math:`\min(\text{decay}, (1 + k) / (10 + k))` after :math:`k`
        updates (the first copies the weights). When set, the call, :meth:`predict` and
        :meth:`loss` use the EMA weights, which are pickled with the net (``ema_module_``).
    ema_restart : bool
        Whether each :meth:`fit`/:meth:`partial_fit` call restarts the EMA's warm-up (its
        first update copies the weights), so that the average covers the steps of the current
        call only, as the ``"cosine"`` schedule restarts per call. ``False`` (default)
        continues the average across calls: its horizon then grows with the steps of all
        calls (about a tenth of them during the warm-up), which, when each call trains on a
        new target (the M-steps of EM), mixes weights fitted to earlier targets into the
        average.
    clip_grad_norm : float or None
        Clip the global gradient norm to this value before each step (``None``: no clipping;
        skorch's ``GradientNormClipping``, callback ``gradient_clipping``). The pre-clipping
        norm is recorded per batch as ``grad_norm`` in the history.
    lr_schedule : {"cosine", "constant"}
        ``"cosine"`` decays the learning rate per batch from ``lr`` to 0 over the
        ``max_epochs`` epochs of each ``fit``/``partial_fit`` call (a warm restart per call;
        skorch's ``LRScheduler`` with torch's ``CosineAnnealingLR``, callback
        ``lr_schedule``); use ``"constant"`` when passing your own ``LRScheduler`` callback.
        The learning rate is back at ``lr`` after each call.
    base : callable or None
        An analytic denoiser :math:`D_0(x_t, \sigma)` that the network refines (e.g. a
        :class:`~diffem.priors.GaussianPrior`): the skip term :math:`c_{\text{skip}} x_t`
        becomes :math:`D_0(x_t, \sigma)`, so that :math:`D_\theta = D_0 + c_{\text{out}}
        F_\theta` and, since the backbones start with a zero output layer, an untrained net is
        exactly :math:`D_0`. ``None``: the EDM skip connection.
    random_state : int, numpy.random.RandomState or None
        Seeds weight initialisation, shuffling and the training noise, with scikit-learn's
        semantics (``None`` draws from NumPy's global random state). Training is
        reproducible on the same device.
    warm_start : bool
        If true, :meth:`fit` continues from the current weights and optimizer state, like
        :meth:`partial_fit`.
    verbose : int
        skorch's verbosity (``0``: silent).
    device : str or torch.device
        Where the module is trained and evaluated (``"cpu"``, ``"cuda"``, ...).
    **kwargs
        Other skorch parameters, prefixed as usual: ``module__*``, ``optimizer__*``,
        ``iterator_train__*``, ``callbacks__*``. The optimizer uses torch's fused kernels
        (``fused=True``; ``foreach=True`` for optimizers without one) unless
        ``optimizer__fused`` or ``optimizer__foreach`` is given; the batches are slices of a
        shuffled index (:class:`~diffem.denoisers.training.TensorBatches`).

    Attributes
    ----------
    module_ : torch.nn.Module
        The trained network :math:`F_\theta`.
    ema_module_ : torch.optim.swa_utils.AveragedModel or None
        Its exponential moving average (``ema_decay`` set); ``ema_module_.n_averaged``
        counts the updates.
    n_features_in_ : int
        Data dimension ``D`` seen at fit.
    history_ : skorch.History
        Per-epoch ``train_loss``, ``lr``, ``dur``; per-batch ``train_loss``, ``grad_norm``.
    total_steps_ : int
        Optimizer steps of the current (or last) ``fit``/``partial_fit`` call.

    Notes
    -----
    The callable protocol: ``net(x_t, sigma)`` with ``x_t`` a ``(B, D)`` tensor and ``sigma``
    a float or a ``(B,)`` tensor returns :math:`D_\theta(x_t, \sigma)` of shape ``(B, D)`` in
    ``x_t``'s dtype and device, computed in eval mode on the module's device and dtype,
    differentiable with respect to ``x_t`` (vector-Jacobian products work).

    Between :meth:`partial_fit` calls (the M-steps of EM), ``set_params(lr=...)`` changes the
    peak learning rate of the next calls, and ``initialize_optimizer()`` starts a fresh
    optimizer (no moment estimates) while keeping the weights and the EMA.
    """

    #: backbone class whose keyword defaults are exposed as ``module__*`` parameters
    default_module: type[nn.Module] | None = None

    def __init__(
        self,
        module: type[nn.Module] | nn.Module,
        *,
        criterion: type[nn.Module] = WeightedMSELoss,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        lr: float = 1e-3,
        max_epochs: int = 64,
        batch_size: int = 256,
        train_split: Any = None,
        callbacks: list[Any] | None = None,
        sigma_min: float = 1e-3,
        sigma_max: float = 1e2,
        sigma_distribution: str = "log_uniform",
        log_sigma_mean: float | None = None,
        log_sigma_std: float = 1.2,
        sigma_data: float = 1.0,
        ema_decay: float | None = None,
        ema_restart: bool = False,
        clip_grad_norm: float | None = 1.0,
        lr_schedule: str = "cosine",
        base: Any = None,
        random_state: int | np.random.RandomState | None = None,
        warm_start: bool = False,
        verbose: int = 0,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("iterator_train", TensorBatches)
        kwargs.setdefault("iterator_valid", TensorBatches)
        kwargs.setdefault("iterator_train__shuffle", True)
        if self.default_module is not None and module is self.default_module:
            for key, value in _module_defaults(module, self._injected_module_args).items():
                kwargs.setdefault(key, value)
        super().__init__(
            module,
            criterion=criterion,
            optimizer=optimizer,
            lr=lr,
            max_epochs=max_epochs,
            batch_size=batch_size,
            train_split=train_split,
            callbacks=callbacks,
            warm_start=warm_start,
            verbose=verbose,
            device=device,
            **kwargs,
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_distribution = sigma_distribution
        self.log_sigma_mean = log_sigma_mean
        self.log_sigma_std = log_sigma_std
        self.sigma_data = sigma_data
        self.ema_decay = ema_decay
        self.ema_restart = ema_restart
        self.clip_grad_norm = clip_grad_norm
        self.lr_schedule = lr_schedule
        self.base = base
        self.random_state = random_state

    # ------------------------------------------------------------------ configuration

    #: module constructor arguments supplied by the net rather than by the user
    _injected_module_args: tuple[str, ...] = ("features",)

    @property
    def schedule(self) -> VESchedule:
        """The training noise schedule ``VESchedule(sigma_min, sigma_max)``."""
        return VESchedule(float(self.sigma_min), float(self.sigma_max))

    def sample_sigma(
        self, n: int, generator: torch.Generator | None = None, device: Any = None
    ) -> Tensor:
        r"""``n`` training noise levels ``(n,)`` from ``sigma_distribution``, in
        :math:`[\sigma_{\min}, \sigma_{\max}]`."""
        if self.sigma_distribution == "log_uniform":
            return self.schedule.sample_sigma(n, generator=generator, device=device)
        low, high = math.log(self.sigma_min), math.log(self.sigma_max)
        mean = (low + high) / 2 if self.log_sigma_mean is None else float(self.log_sigma_mean)
        log_sigma = torch.empty(n, device=device)
        nn.init.trunc_normal_(log_sigma, mean, float(self.log_sigma_std), low, high, generator)
        return log_sigma.exp()

    @property
    def preconditioning(self) -> EDMPreconditioning:
        """The EDM coefficients ``EDMPreconditioning(sigma_data)``."""
        return EDMPreconditioning(float(self.sigma_data))

    def _check_hyperparameters(self) -> None:
        self.schedule  # noqa: B018  (validates sigma_min < sigma_max)
        check_number(self.sigma_data, "sigma_data", 0.0, low_open=True)
        if self.ema_decay is not None:
            check_number(self.ema_decay, "ema_decay", 0.0, 1.0, high_open=True)
        if not isinstance(self.ema_restart, (bool, np.bool_)):
            raise ValueError(f"ema_restart must be a bool, got {self.ema_restart!r}.")
        if self.clip_grad_norm is not None:
            check_number(self.clip_grad_norm, "clip_grad_norm", 0.0, low_open=True)
        if self.sigma_distribution not in _SIGMA_DISTRIBUTIONS:
            raise ValueError(
                f"sigma_distribution must be one of {_SIGMA_DISTRIBUTIONS}, got "
                f"{self.sigma_distribution!r}."
            )
        if self.log_sigma_mean is not None:
            check_number(self.log_sigma_mean, "log_sigma_mean", -math.inf)
        check_number(self.log_sigma_std, "log_sigma_std", 0.0, low_open=True)
        if self.lr_schedule not in _LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {_LR_SCHEDULES}, got {self.lr_schedule!r}."
            )
        check_int(self.max_epochs, "max_epochs", 0)

    def _default_features(self) -> int | None:
        """Data dimension to use when the net is initialised before seeing data."""
        return None

    def _extra_module_kwargs(self) -> dict[str, Any]:
        """Module constructor arguments the net supplies besides ``features`` (from its own
        parameters, e.g. ``image_shape``), unless given as ``module__*``."""
        return {}

    # ------------------------------------------------------------------ initialisation

    def _rng(self) -> torch.Generator:
        """CPU generator for seeds and shuffling (created from ``random_state``)."""
        rng = getattr(self, "rng_", None)
        if rng is None:
            rng = torch_generator(self.random_state)
            self.rng_ = rng
        return rng

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self._rng()).item())

    def initialize(self) -> Denoiser:
        """(Re)initialise the module, EMA copy, optimizer, callbacks and history."""
        self._check_hyperparameters()
        self.rng_ = None
        self._rng()
        return super().initialize()

    def initialize_for(self, n_features: int) -> Denoiser:
        """Initialise an untrained net for data of dimension ``n_features`` (without data)."""
        expected = self._default_features()
        if expected is not None and n_features != expected:
            raise ValueError(
                f"n_features must be {expected} for {type(self).__name__}, got {n_features!r}."
            )
        self.n_features_in_ = int(n_features)
        return self.initialize()

    def initialize_module(self) -> Denoiser:
        """Instantiate :math:`F_\\theta` with ``features`` from the data, and its EMA copy."""
        kwargs = self.get_params_for("module")
        seed = self._draw_seed()
        if isinstance(self.module, nn.Module) and not kwargs:
            # a ready instance is used as is (skorch's convention)
            self.module_ = self.module
        else:
            if "features" not in kwargs:
                features = getattr(self, "n_features_in_", None) or self._default_features()
                if features is None:
                    raise ValueError(
                        f"{type(self).__name__} infers the input size from X: call fit(X) or "
                        "partial_fit(X), or set module__features, before initialize()."
                    )
                kwargs["features"] = int(features)
            for key, value in self._extra_module_kwargs().items():
                kwargs.setdefault(key, value)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.module_ = self.initialized_instance(self.module, kwargs)
        if self.ema_decay is not None:
            self.ema_module_ = self._make_ema(self.module_)
        elif hasattr(self, "ema_module_"):
            self.ema_module_ = None
        return self

    def _make_ema(self, module: nn.Module) -> AveragedModel:
        """torch's :class:`~torch.optim.swa_utils.AveragedModel` of ``module`` with the
        warm-up EMA update (:class:`~diffem.denoisers.training.WarmupEMA`)."""
        ema = AveragedModel(module, multi_avg_fn=WarmupEMA(float(self.ema_decay)))
        ema.requires_grad_(False)
        ema.eval()
        return ema

    def get_params_for_optimizer(
        self, prefix: str, named_parameters: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """skorch's optimizer arguments, with torch's fused (or multi-tensor) kernels by
        default (:func:`~diffem.denoisers.training.fast_optimizer_defaults`); the optimizer
        only sees the weights of ``module_`` (never the EMA copy)."""
        args, kwargs = super().get_params_for_optimizer(prefix, named_parameters)
        if prefix == "optimizer":
            kwargs = {**fast_optimizer_defaults(self.optimizer, kwargs), **kwargs}
        return args, kwargs

    def get_default_callbacks(self) -> list[tuple[str, Any]]:
        """skorch's defaults, then the cosine schedule (active with ``lr_schedule="cosine"``)
        and the gradient clipping (to ``clip_grad_norm``, passed on when training begins)."""
        return [
            *super().get_default_callbacks(),
            ("lr_schedule", CosineSchedule()),
            ("gradient_clipping", GradientNormClipping()),
        ]

    def _set_training(self, training: bool = True) -> None:
        """Train or eval mode for ``module_`` and ``criterion_``, set when it changes (the EMA
        copy stays in eval mode)."""
        for name in ("module_", "criterion_"):
            sub = getattr(self, name, None)
            if isinstance(sub, nn.Module) and sub.training != training:
                sub.train(training)

    def get_all_learnable_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters: those of ``module_`` and ``criterion_`` (not ``ema_module_``)."""
        seen: set[int] = set()
        for name in ("module_", "criterion_"):
            sub = getattr(self, name, None)
            if not isinstance(sub, nn.Module):
                continue
            for pname, param in sub.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield pname, param

    # ------------------------------------------------------------------ data

    def _validate_data(self, X: Any, reset: bool) -> Tensor:
        """``X`` ``(n, D)`` (NumPy or torch) as a finite float32 tensor whose ``D`` matches the
        net (or sets ``n_features_in_`` when ``reset``)."""
        t = as_float_tensor(X, "X", dtype=torch.float32)
        if t.ndim != 2 or t.shape[0] < 1:
            raise ValueError(
                "X must be 2-D of shape (n_samples, n_features) with n_samples >= 1, got "
                f"shape {tuple(t.shape)}."
            )
        check_finite(t, "X")
        d = t.shape[1]
        expected = self._default_features()
        if expected is not None and d != expected:
            raise ValueError(
                f"X must have shape (n_samples, {expected}) for {type(self).__name__} with "
                f"these settings, got {tuple(t.shape)}."
            )
        if reset:
            self.n_features_in_ = d
        elif d != self.n_features_in_:
            raise ValueError(
                f"X must have shape (n_samples, {self.n_features_in_}) (the net was fitted on "
                f"{self.n_features_in_} features), got {tuple(t.shape)}."
            )
        return t

    def get_iterator(self, dataset: Any, training: bool = False) -> Any:
        """skorch's iterator, with a seeded shuffling generator for training; sets
        ``total_steps_``, the optimizer steps of this ``fit``/``partial_fit`` call."""
        if not training:
            return super().get_iterator(dataset, training=False)
        kwargs = self.get_params_for("iterator_train")
        if kwargs.get("shuffle") and "generator" not in kwargs and "sampler" not in kwargs:
            kwargs["generator"] = self._rng()
        kwargs.setdefault("batch_size", self.batch_size)
        if kwargs["batch_size"] == -1:
            kwargs["batch_size"] = len(dataset)
        iterator = self.iterator_train(dataset, **kwargs)
        self.total_steps_ = len(iterator) * int(self.max_epochs)
        return iterator

    # ------------------------------------------------------------------ training

    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> Denoiser:
        r"""Train on clean samples ``X`` of shape ``(n, D)`` for ``max_epochs`` epochs.

        Reinitialises the module first unless ``warm_start`` is set and the net is
        initialised. ``y`` is ignored. Raises :class:`DivergenceError` on a non-finite loss
        (after restoring the weights from the start of the failing epoch).
        """
        warm = bool(self.warm_start) and bool(self.initialized_)
        t = self._validate_data(X, reset=not warm)
        if not warm:
            self.initialize()
        return self.partial_fit(t, **fit_params)

    def partial_fit(
        self, X: Any, y: Any = None, classes: Any = None, **fit_params: Any
    ) -> Denoiser:
        r"""Continue training on ``X`` ``(n, D)`` for ``max_epochs`` epochs (warm start).

        Keeps the weights, EMA weights and optimizer state; the ``"cosine"`` learning-rate
        schedule restarts at ``lr`` for this call (and the EMA's warm-up with
        ``ema_restart``). Initialises the net on the first call.
        """
        if fit_params:
            raise TypeError(
                f"{type(self).__name__}.fit/partial_fit take no extra fit parameters, got "
                f"{sorted(fit_params)}."
            )
        self._check_hyperparameters()
        t = self._validate_data(X, reset=not self.initialized_)
        if not self.initialized_:
            self.initialize()
        ema = getattr(self, "ema_module_", None)
        if self.ema_decay is not None and ema is None:
            # EMA switched on after initialisation: start it from the current weights
            with self._current_init_context("module"):
                self.ema_module_ = self._make_ema(self.module_)
        elif self.ema_decay is not None:
            ema.multi_avg_fn = WarmupEMA(float(self.ema_decay))
            if self.ema_restart:
                ema.n_averaged.zero_()  # the next update copies the weights
        noise_device = torch.device(self.device)
        self.noise_rng_ = torch.Generator(device=noise_device).manual_seed(self._draw_seed())
        self.last_good_ = None  # snapshot at the start of each epoch (on_epoch_begin)
        try:
            super().partial_fit(t)
        except DivergenceError:
            self._restore(self.last_good_)
            if len(self.history_) and "train_loss" not in self.history_[-1]:
                self.history_.pop()
            raise
        finally:
            self.last_good_ = None
            self.noise_rng_ = None
            for group in self.optimizer_.param_groups:
                # the learning rate the schedule started from (torch's convention)
                group["lr"] = group.pop("initial_lr", group["lr"])
        return self

    def _snapshot(self) -> dict[str, Any]:
        ema = getattr(self, "ema_module_", None)
        return {
            "module": _cloned(self.module_.state_dict()),
            "ema": None if ema is None else _cloned(ema.state_dict()),
            "optimizer": _cloned(self.optimizer_.state_dict()),
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        self.module_.load_state_dict(snap["module"])
        ema = getattr(self, "ema_module_", None)
        if ema is not None and snap["ema"] is not None:
            ema.load_state_dict(snap["ema"])
        self.optimizer_.load_state_dict(snap["optimizer"])

    def on_epoch_begin(
        self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any
    ) -> None:
        super().on_epoch_begin(
            net, dataset_train=dataset_train, dataset_valid=dataset_valid, **kwargs
        )
        self.last_good_ = self._snapshot()

    def on_epoch_end(
        self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any
    ) -> None:
        super().on_epoch_end(
            net, dataset_train=dataset_train, dataset_valid=dataset_valid, **kwargs
        )
        self.history_.record("lr", float(self.optimizer_.param_groups[0]["lr"]))

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        """Passes ``clip_grad_norm`` on to the clipping callback."""
        super().on_train_begin(net, X=X, y=y, **kwargs)
        clipping = dict(self.callbacks_).get("gradient_clipping")
        if clipping is not None:
            clipping.gradient_clip_value = self.clip_grad_norm

    def _noisy_batch(
        self, x: Tensor, generator: torch.Generator | None, sigma: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x_t, sigma)`` with ``x_t = x + sigma z``, ``sigma`` drawn if not given."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        n = x.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(n, generator=generator, device=gen_device)
        z = torch.randn(x.shape, generator=generator, device=gen_device)
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        return x + sigma.reshape(-1, *([1] * (x.ndim - 1))) * z.to(x.device, x.dtype), sigma

    def _denoising_loss(
        self,
        module: nn.Module,
        x: Tensor,
        generator: torch.Generator | None,
        sigma: Tensor | None = None,
        training: bool = False,
    ) -> tuple[Tensor, Tensor]:
        x_t, sigma = self._noisy_batch(x, generator, sigma)
        denoised = self._denoise(module, x_t, sigma)
        weight = self.preconditioning.loss_weight(sigma)
        loss = self.get_loss(denoised, x, X=x_t, training=training, weight=weight)
        return loss, denoised

    def get_loss(
        self,
        y_pred: Tensor,
        y_true: Tensor,
        X: Any = None,
        training: bool = False,
        weight: Tensor | None = None,
    ) -> Tensor:
        r"""EDM-weighted loss :math:`\lambda(\sigma) \lVert D(x_t, \sigma) - x \rVert^2 / D`,
        averaged over the batch (``y_pred`` the denoised batch, ``y_true`` the clean one)."""
        if weight is None:
            weight = torch.ones(y_pred.shape[0], device=y_pred.device, dtype=y_pred.dtype)
        return self.criterion_(y_pred, y_true, weight)

    def train_step_single(self, batch: Any, **fit_params: Any) -> dict[str, Tensor]:
        r"""One denoising-score-matching gradient: draw :math:`\sigma_i` from the training
        distribution and :math:`z_i \sim \mathcal{N}(0, I)` per sample, backpropagate the
        EDM loss (a non-finite loss raises :class:`DivergenceError`)."""
        self._set_training(True)
        x, _ = unpack_data(batch)
        x = to_tensor(x, device=self.device).to(torch.float32)
        loss, denoised = self._denoising_loss(self.module_, x, self.noise_rng_, training=True)
        if not bool(torch.isfinite(loss)):
            self._diverged(f"the training loss is {loss.item()}")
        loss.backward()
        return {"loss": loss, "y_pred": denoised}

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, Tensor]:
        """skorch's optimizer step (the callbacks schedule the learning rate and clip the
        gradient), a divergence check on the gradient norm, and the EMA update."""
        step = super().train_step(batch, **fit_params)
        norm = self.history_[-1, "batches", -1].get("grad_norm", 0.0)
        if not math.isfinite(norm):
            self._diverged(f"the gradient norm is {norm}")
        ema = getattr(self, "ema_module_", None)
        if self.ema_decay is not None and ema is not None:
            ema.update_parameters(self.module_)
        return step

    def _diverged(self, what: str) -> None:
        epoch = len(self.history_)
        raise DivergenceError(
            f"{type(self).__name__} training diverged at epoch {epoch}: {what}. The weights "
            "and optimizer state were restored from the start of that epoch. Try a smaller "
            f"lr (now {self.lr!r}), gradient clipping (clip_grad_norm, now "
            f"{self.clip_grad_norm!r}), or check the scale of X."
        )

    def validation_step(self, batch: Any, **fit_params: Any) -> dict[str, Tensor]:
        """Denoising loss of the inference weights on a held-out batch (random noise)."""
        module = self._inference_module()
        self._set_training(False)
        x, _ = unpack_data(batch)
        x = to_tensor(x, device=self.device).to(torch.float32)
        with torch.no_grad():
            loss, denoised = self._denoising_loss(module, x, self.noise_rng_)
        return {"loss": loss, "y_pred": denoised}

    def infer(self, x: Any, **fit_params: Any) -> Tensor:
        raise TypeError(
            f"{type(self).__name__} needs a noise level: call net(x_t, sigma) or "
            "net.predict(X, sigma) instead of forward/infer."
        )

    # ------------------------------------------------------------------ inference

    def _inference_module(self) -> nn.Module:
        self.check_is_fitted(["module_"])
        ema = getattr(self, "ema_module_", None)
        if self.ema_decay is not None and ema is not None:
            return ema
        return self.module_

    def _denoise(self, module: nn.Module, x_t: Tensor, sigma: Tensor) -> Tensor:
        r""":math:`c_{\text{skip}} x_t + c_{\text{out}} F(c_{\text{in}} x_t, c_{\text{noise}})`
        for ``x_t`` ``(B, D)`` and ``sigma`` ``(B,)``; with ``base``, :math:`D_0(x_t, \sigma)`
        in place of the skip term."""
        pre = self.preconditioning
        s = sigma.reshape(-1, *([1] * (x_t.ndim - 1)))
        # sigma = 0 gives D = x_t exactly; the clamp only keeps c_noise finite.
        safe = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
        out = module(pre.c_in(s) * x_t, pre.c_noise(safe))
        skip = pre.c_skip(s) * x_t if self.base is None else self.base(x_t, safe)
        return skip + pre.c_out(s) * out

    def _module_dtype_device(self, module: nn.Module) -> tuple[torch.dtype, torch.device]:
        p = next(module.parameters(), None)
        if p is None:
            return torch.float32, torch.device(self.device)
        return p.dtype, p.device

    def __call__(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""Denoise: :math:`D_\theta(x_t, \sigma) \approx E[x \mid x_t]`.

        Parameters
        ----------
        x_t : Tensor, shape ``(B, D)``
            Noisy samples :math:`x + \sigma z`.
        sigma : float or Tensor, shape ``()``, ``(1,)`` or ``(B,)``
            Noise levels (non-negative; ``0`` returns ``x_t``).

        Returns
        -------
        Tensor, shape ``(B, D)``, with ``x_t``'s dtype and device; differentiable in ``x_t``.
        Uses the EMA weights when ``ema_decay`` is set.
        """
        module = self._inference_module()
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch tensor of shape (B, D), got {type(x_t)}.")
        if x_t.ndim != 2 or x_t.shape[1] != self.n_features_in_:
            raise ValueError(
                f"x_t must have shape (B, {self.n_features_in_}), got {tuple(x_t.shape)}."
            )
        dtype, device = self._module_dtype_device(module)
        b = x_t.shape[0]
        s = torch.as_tensor(sigma, device=device).to(dtype)
        if s.ndim == 0 or s.shape == (1,):
            s = s.reshape(()).expand(b)
        elif s.shape != (b,):
            raise ValueError(f"sigma must be a scalar or have shape ({b},), got {tuple(s.shape)}.")
        if module.training:
            module.eval()
        out = self._denoise(module, x_t.to(device=device, dtype=dtype), s)
        return out.to(device=x_t.device, dtype=x_t.dtype)

    def predict(self, X: Any, sigma: Any = None) -> np.ndarray:
        r"""Denoise noisy samples ``X`` ``(n, D)`` at noise level(s) ``sigma`` (float or
        ``(n,)``): returns :math:`D_\theta(X, \sigma)` as a float32 NumPy array ``(n, D)``."""
        if sigma is None:
            raise TypeError("predict(X, sigma) needs the noise level sigma of X.")
        module = self._inference_module()
        x = self._validate_data(X, reset=False)
        s = torch.as_tensor(np.asarray(sigma) if not isinstance(sigma, Tensor) else sigma)
        s = s.to(torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(len(x))
        elif s.numel() != len(x):
            raise ValueError(
                f"sigma must be a scalar or have shape ({len(x)},), got {tuple(np.shape(sigma))}."
            )
        dtype, device = self._module_dtype_device(module)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), max(int(self.batch_size), 1)):
                sl = slice(i, i + max(int(self.batch_size), 1))
                outs.append(self(x[sl].to(device, dtype), s[sl].to(device, dtype)).cpu())
        return torch.cat(outs).numpy().astype(np.float32, copy=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} has no predict_proba; use predict(X, sigma).")

    def loss(self, X: Any, sigma: Any = None, generator: torch.Generator | None = None) -> float:
        r"""EDM denoising loss of the inference weights on clean samples ``X`` ``(n, D)``.

        .. math:: \frac{1}{n D} \sum_i \lambda(\sigma_i)
            \lVert D_\theta(x_i + \sigma_i z_i, \sigma_i) - x_i \rVert^2

        ``sigma`` ``None`` draws the levels from ``sigma_distribution`` (the
        training objective); a float or ``(n,)`` array fixes them. The noise is drawn from
        ``generator`` (CPU or the module's device; deterministic given its state).
        """
        module = self._inference_module()
        x = self._validate_data(X, reset=False)
        dtype, device = self._module_dtype_device(module)
        n = len(x)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if sigma is None:
            s = self.sample_sigma(n, generator=generator, device=gen_device)
        else:
            s = torch.as_tensor(np.asarray(sigma) if not isinstance(sigma, Tensor) else sigma)
            s = s.to(torch.float32).reshape(-1)
            if s.numel() == 1:
                s = s.expand(n)
            elif s.numel() != n:
                raise ValueError(f"sigma must be a scalar or have shape ({n},).")
        was_training = module.training
        if module.training:
            module.eval()
        total = 0.0
        bs = max(int(self.batch_size), 1)
        with torch.no_grad():
            for i in range(0, n, bs):
                xb = x[i : i + bs].to(device, dtype)
                loss, _ = self._denoising_loss(module, xb, generator, s[i : i + bs])
                total += float(loss) * len(xb)
        module.train(was_training)
        return total / n

    # ------------------------------------------------------------------ devices, pickling

    def to(self, device: str | torch.device) -> Denoiser:
        """Move the fitted net (weights, EMA, optimizer state) to ``device`` and set
        ``self.device``; returns ``self``."""
        self.device = str(device) if isinstance(device, torch.device) else device
        if not self.initialized_:
            return self
        for name in [*self._modules, *self._criteria]:
            sub = getattr(self, name + "_", None)
            if isinstance(sub, nn.Module):
                sub.to(device)
        if getattr(self, "optimizer_", None) is not None:
            self.optimizer_.load_state_dict(self.optimizer_.state_dict())
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # transient training state (device generator, epoch snapshot) is not persisted
        state["noise_rng_"] = None
        state["last_good_"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # skorch maps CUDA tensors to the CPU when CUDA is unavailable (with a DeviceWarning)
        super().__setstate__(state)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
