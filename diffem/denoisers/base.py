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
(the training noise levels of Rozet et al., 2024). The minimiser is the Tweedie posterior
mean :math:`E[x \mid x_t]`, whose Jacobian gives :math:`\text{Cov}[x \mid x_t] = \sigma^2
\nabla_{x_t} E[x \mid x_t]`, which is what the posterior samplers use.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from skorch import NeuralNet
from skorch.dataset import unpack_data
from skorch.utils import TeeGenerator, to_tensor
from torch import Tensor, nn

from ..schedule import EDMPreconditioning, VESchedule

__all__ = ["Denoiser", "DivergenceError", "WeightedMSELoss"]

_LR_SCHEDULES = ("cosine", "constant")


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


def _seed_from_random_state(random_state: Any) -> int:
    """A 62-bit seed from ``None`` (torch's global RNG), an int or a NumPy ``RandomState``."""
    if random_state is None:
        return int(torch.randint(0, 2**62, ()).item())
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state)
    raise TypeError(
        "random_state must be None, an int or a numpy.random.RandomState, got "
        f"{type(random_state).__name__}."
    )


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
        Range of the log-uniform training noise levels (:class:`~diffem.schedule.VESchedule`).
    sigma_data : float
        Data scale of the EDM preconditioning (:class:`~diffem.schedule.EDMPreconditioning`).
    ema_decay : float or None
        Decay of an exponential moving average of the weights, updated after every
        optimizer step with the warm-up :math:`\min(\text{decay}, (1 + k) / (10 + k))` at
        step :math:`k`. When set, the call, :meth:`predict` and :meth:`loss` use the EMA
        weights, which are pickled with the net (``ema_module_``).
    clip_grad_norm : float or None
        Clip the global gradient norm to this value before each step (``None``: no clipping).
        The pre-clipping norm is recorded per batch as ``grad_norm`` in the history.
    lr_schedule : {"cosine", "constant"}
        ``"cosine"`` decays the learning rate per batch from ``lr`` to 0 over the
        ``max_epochs`` epochs of each ``fit``/``partial_fit`` call (a warm restart per call);
        use ``"constant"`` when passing your own ``LRScheduler`` callback.
    base : callable or None
        An analytic denoiser :math:`D_0(x_t, \sigma)` that the network refines (e.g. a
        :class:`~diffem.priors.GaussianPrior`): the skip term :math:`c_{\text{skip}} x_t`
        becomes :math:`D_0(x_t, \sigma)`, so that :math:`D_\theta = D_0 + c_{\text{out}}
        F_\theta` and, since the backbones start with a zero output layer, an untrained net is
        exactly :math:`D_0`. ``None``: the EDM skip connection.
    random_state : int, numpy.random.RandomState or None
        Seeds weight initialisation, shuffling and the training noise. ``None`` draws from
        torch's global RNG. Training is reproducible on the same device.
    warm_start : bool
        If true, :meth:`fit` continues from the current weights and optimizer state, like
        :meth:`partial_fit`.
    verbose : int
        skorch's verbosity (``0``: silent).
    device : str or torch.device
        Where the module is trained and evaluated (``"cpu"``, ``"cuda"``, ...).
    **kwargs
        Other skorch parameters, prefixed as usual: ``module__*``, ``optimizer__*``,
        ``iterator_train__*``, ``callbacks__*``.

    Attributes
    ----------
    module_ : torch.nn.Module
        The trained network :math:`F_\theta`.
    ema_module_ : torch.nn.Module or None
        Its exponential moving average (``ema_decay`` set).
    n_features_in_ : int
        Data dimension ``D`` seen at fit.
    history_ : skorch.History
        Per-epoch ``train_loss``, ``lr``, ``dur``; per-batch ``train_loss``, ``grad_norm``.

    Notes
    -----
    The callable protocol: ``net(x_t, sigma)`` with ``x_t`` a ``(B, D)`` tensor and ``sigma``
    a float or a ``(B,)`` tensor returns :math:`D_\theta(x_t, \sigma)` of shape ``(B, D)`` in
    ``x_t``'s dtype and device, computed in eval mode on the module's device and dtype,
    differentiable with respect to ``x_t`` (vector-Jacobian products work).
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
        sigma_data: float = 1.0,
        ema_decay: float | None = None,
        clip_grad_norm: float | None = 1.0,
        lr_schedule: str = "cosine",
        base: Any = None,
        random_state: int | np.random.RandomState | None = None,
        warm_start: bool = False,
        verbose: int = 0,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> None:
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
        self.sigma_data = sigma_data
        self.ema_decay = ema_decay
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

    @property
    def preconditioning(self) -> EDMPreconditioning:
        """The EDM coefficients ``EDMPreconditioning(sigma_data)``."""
        return EDMPreconditioning(float(self.sigma_data))

    def _check_hyperparameters(self) -> None:
        self.schedule  # noqa: B018  (validates sigma_min < sigma_max)
        if not (isinstance(self.sigma_data, numbers.Real) and 0 < self.sigma_data < math.inf):
            raise ValueError(f"sigma_data must be a positive float, got {self.sigma_data!r}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1), got {self.ema_decay!r}.")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(
                f"clip_grad_norm must be None or positive, got {self.clip_grad_norm!r}."
            )
        if self.lr_schedule not in _LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {_LR_SCHEDULES}, got {self.lr_schedule!r}."
            )
        if not isinstance(self.max_epochs, numbers.Integral) or self.max_epochs < 0:
            raise ValueError(f"max_epochs must be a non-negative integer, got {self.max_epochs!r}.")

    def _default_features(self) -> int | None:
        """Data dimension to use when the net is initialised before seeing data."""
        return None

    # ------------------------------------------------------------------ initialisation

    def _rng(self) -> torch.Generator:
        """CPU generator for seeds and shuffling (created from ``random_state``)."""
        rng = getattr(self, "rng_", None)
        if rng is None:
            rng = torch.Generator().manual_seed(_seed_from_random_state(self.random_state))
            self.rng_ = rng
        return rng

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self._rng()).item())

    def initialize(self) -> Denoiser:
        """(Re)initialise the module, EMA copy, optimizer, callbacks and history."""
        self._check_hyperparameters()
        self.rng_ = None
        self._rng()
        self.ema_steps_ = 0
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.module_ = self.initialized_instance(self.module, kwargs)
        if self.ema_decay is not None:
            self.ema_module_ = self._make_ema(self.module_)
        elif hasattr(self, "ema_module_"):
            self.ema_module_ = None
        self.ema_steps_ = 0
        return self

    @staticmethod
    def _make_ema(module: nn.Module) -> nn.Module:
        ema = copy.deepcopy(module)
        ema.requires_grad_(False)
        ema.eval()
        return ema

    def initialize_optimizer(self, triggered_directly: Any = None) -> Denoiser:
        """Optimizer over the weights of ``module_`` (never the EMA copy)."""
        super().initialize_optimizer()
        for group in self.optimizer_.param_groups:
            group["base_lr"] = group["lr"]
        return self

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

    def set_params(self, **kwargs: Any) -> Denoiser:
        super().set_params(**kwargs)
        lr_keys = [k for k in kwargs if k == "lr" or (k.startswith("optimizer__") and "lr" in k)]
        if lr_keys and getattr(self, "optimizer_", None) is not None:
            for group in self.optimizer_.param_groups:
                group["base_lr"] = group["lr"]
        return self

    # ------------------------------------------------------------------ data

    def _as_tensor(self, X: Any, name: str = "X") -> Tensor:
        """Validate ``X`` of shape ``(n, D)`` (NumPy or torch) into a float32 tensor."""
        if isinstance(X, Tensor):
            t = X.detach()
        else:
            try:
                t = torch.as_tensor(np.asarray(X))
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"{name} must be a NumPy array or a torch tensor of shape "
                    f"(n_samples, n_features), got {type(X).__name__}."
                ) from exc
        if t.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D of shape (n_samples, n_features), got shape {tuple(t.shape)}."
            )
        if t.shape[0] < 1:
            raise ValueError(
                f"{name} must contain at least one sample, got shape {tuple(t.shape)}."
            )
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.bool)):
            raise TypeError(f"{name} must have a real dtype, got {t.dtype}.")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values.")
        return t

    def _validate_data(self, X: Any, reset: bool) -> Tensor:
        t = self._as_tensor(X)
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
        """skorch's iterator, with a seeded shuffling generator for training."""
        if training:
            # the cosine schedule spans the epochs of this call over the training split
            self.total_steps_ = self._batches_per_epoch(len(dataset)) * int(self.max_epochs)
            kwargs = self.get_params_for("iterator_train")
            if kwargs.get("shuffle") and "generator" not in kwargs and "sampler" not in kwargs:
                kwargs.setdefault("batch_size", self.batch_size)
                if kwargs["batch_size"] == -1:
                    kwargs["batch_size"] = len(dataset)
                return self.iterator_train(dataset, generator=self._rng(), **kwargs)
        return super().get_iterator(dataset, training=training)

    def _batches_per_epoch(self, n: int) -> int:
        kwargs = self.get_params_for("iterator_train")
        bs = kwargs.get("batch_size", self.batch_size)
        bs = n if bs == -1 else int(bs)
        return max(1, n // bs if kwargs.get("drop_last") else math.ceil(n / bs))

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
        schedule restarts at ``lr`` for this call. Initialises the net on the first call.
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
        if self.ema_decay is not None and getattr(self, "ema_module_", None) is None:
            # EMA switched on after initialisation: start it from the current weights
            with self._current_init_context("module"):
                self.ema_module_ = self._make_ema(self.module_)
            self.ema_steps_ = 0
        noise_device = torch.device(self.device)
        self.noise_rng_ = torch.Generator(device=noise_device).manual_seed(self._draw_seed())
        self.total_steps_ = self._batches_per_epoch(len(t)) * int(self.max_epochs)
        self.call_steps_ = 0
        self.last_good_ = self._snapshot()
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
                group["lr"] = group.get("base_lr", group["lr"])
        return self

    def _snapshot(self) -> dict[str, Any]:
        ema = getattr(self, "ema_module_", None)
        return {
            "module": copy.deepcopy(self.module_.state_dict()),
            "ema": None if ema is None else copy.deepcopy(ema.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer_.state_dict()),
            "ema_steps": self.ema_steps_,
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        self.module_.load_state_dict(snap["module"])
        ema = getattr(self, "ema_module_", None)
        if ema is not None and snap["ema"] is not None:
            ema.load_state_dict(snap["ema"])
        self.optimizer_.load_state_dict(snap["optimizer"])
        self.ema_steps_ = snap["ema_steps"]

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

    def _apply_lr_schedule(self) -> None:
        if self.lr_schedule != "cosine":
            return
        k, total = self.call_steps_, max(self.total_steps_, 1)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total))
        for group in self.optimizer_.param_groups:
            group["lr"] = group["base_lr"] * factor

    def _noisy_batch(
        self, x: Tensor, generator: torch.Generator | None, sigma: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x_t, sigma)`` with ``x_t = x + sigma z`` and log-uniform ``sigma`` if not given."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        n = x.shape[0]
        if sigma is None:
            sigma = self.schedule.sample_sigma(n, generator=generator, device=gen_device)
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
        r"""One denoising-score-matching gradient: draw :math:`\sigma_i` log-uniform and
        :math:`z_i \sim \mathcal{N}(0, I)` per sample, backpropagate the EDM loss."""
        self._set_training(True)
        if getattr(self, "ema_module_", None) is not None:
            self.ema_module_.eval()
        x, _ = unpack_data(batch)
        x = to_tensor(x, device=self.device).to(torch.float32)
        loss, denoised = self._denoising_loss(self.module_, x, self.noise_rng_, training=True)
        loss.backward()
        return {"loss": loss, "y_pred": denoised}

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, Tensor]:
        """Optimizer step with learning-rate schedule, gradient clipping, divergence check
        and EMA update."""
        accumulator = self.get_train_step_accumulator()
        self._apply_lr_schedule()

        def step_fn() -> Tensor:
            self._zero_grad_optimizer()
            step = self.train_step_single(batch, **fit_params)
            accumulator.store_step(step)
            loss = step["loss"]
            if not bool(torch.isfinite(loss)):
                self._diverged(f"the training loss is {loss.item()}")
            self.notify(
                "on_grad_computed",
                named_parameters=TeeGenerator(self.get_all_learnable_params()),
                batch=batch,
                training=True,
            )
            if self.clip_grad_norm is not None:
                params = [p for _, p in self.get_all_learnable_params()]
                norm = torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad_norm))
                norm_value = float(norm)
                if not math.isfinite(norm_value):
                    self._diverged(f"the gradient norm is {norm_value}")
                self.history_.record_batch("grad_norm", norm_value)
            return loss

        self._step_optimizer(step_fn)
        self.call_steps_ += 1
        self._update_ema()
        return accumulator.get_step()

    def _diverged(self, what: str) -> None:
        epoch = len(self.history_)
        raise DivergenceError(
            f"{type(self).__name__} training diverged at epoch {epoch}: {what}. The weights "
            "and optimizer state were restored from the start of that epoch. Try a smaller "
            f"lr (now {self.lr!r}), gradient clipping (clip_grad_norm, now "
            f"{self.clip_grad_norm!r}), or check the scale of X."
        )

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema = getattr(self, "ema_module_", None)
        if self.ema_decay is None or ema is None:
            return
        k = self.ema_steps_
        decay = min(float(self.ema_decay), (1.0 + k) / (10.0 + k))
        for p_ema, p in zip(ema.parameters(), self.module_.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(ema.buffers(), self.module_.buffers(), strict=True):
            b_ema.copy_(b)
        self.ema_steps_ = k + 1

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

        ``sigma`` ``None`` draws log-uniform levels in ``[sigma_min, sigma_max]`` (the
        training objective); a float or ``(n,)`` array fixes them. The noise is drawn from
        ``generator`` (CPU or the module's device; deterministic given its state).
        """
        module = self._inference_module()
        x = self._validate_data(X, reset=False)
        dtype, device = self._module_dtype_device(module)
        n = len(x)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if sigma is None:
            s = self.schedule.sample_sigma(n, generator=generator, device=gen_device)
        else:
            s = torch.as_tensor(np.asarray(sigma) if not isinstance(sigma, Tensor) else sigma)
            s = s.to(torch.float32).reshape(-1)
            if s.numel() == 1:
                s = s.expand(n)
            elif s.numel() != n:
                raise ValueError(f"sigma must be a scalar or have shape ({n},).")
        was_training = module.training
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
