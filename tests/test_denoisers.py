"""Tests of the learned denoisers (diffem.denoisers)."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from collections.abc import Iterator

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, clone
from skorch.callbacks import Callback, Checkpoint, EarlyStopping, ProgressBar

from diffem.denoisers import (
    MLP,
    Denoiser,
    DivergenceError,
    MLPDenoiser,
    Transformer,
    TransformerDenoiser,
    UNet,
    UNetDenoiser,
)
from diffem.denoisers.training import TensorBatches, WarmupEMA

SMALL = {"module__hidden_features": 32, "module__n_blocks": 1, "module__emb_features": 16}
SMALL_UNET = {"module__channels": (8, 16), "module__emb_features": 16}
SMALL_TRANSFORMER = {"module__hidden_features": 16, "module__n_blocks": 1, "module__heads": 2}


def _small_nets(**kwargs) -> dict[str, Denoiser]:
    """One small unfitted net of each kind, on 4x4 images (16 features)."""
    return {
        "mlp": MLPDenoiser(**SMALL, **kwargs),
        "unet": UNetDenoiser(image_shape=(1, 4, 4), **SMALL_UNET, **kwargs),
        "transformer": TransformerDenoiser(image_shape=(1, 4, 4), **SMALL_TRANSFORMER, **kwargs),
    }


def _gaussian(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([1.5, -1.0])
    s = torch.tensor([0.5, 2.0])
    return mu + s * torch.randn(n, 2, generator=g), mu, s


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.fixture(scope="module")
def fitted() -> MLPDenoiser:
    X, _, _ = _gaussian(512)
    return MLPDenoiser(max_epochs=2, batch_size=128, random_state=0, **SMALL).fit(X)


# ---------------------------------------------------------------- protocol, shapes


def test_protocol_shapes_and_dtypes(fitted: MLPDenoiser) -> None:
    x = torch.randn(5, 2)
    for sigma in (0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((5,), 0.5)):
        out = fitted(x, sigma)
        assert out.shape == (5, 2) and out.dtype == torch.float32
    assert torch.allclose(fitted(x, 0.5), fitted(x, torch.full((5,), 0.5)))
    out64 = fitted(x.double(), torch.linspace(0.1, 10, 5, dtype=torch.float64))
    assert out64.dtype == torch.float64 and torch.isfinite(out64).all()
    # sigma = 0 returns x_t exactly
    assert torch.equal(fitted(x, 0.0), x)
    assert fitted.n_features_in_ == 2
    assert (fitted.sigma_min, fitted.sigma_max, fitted.sigma_data) == (1e-3, 1e2, 1.0)
    with pytest.raises(ValueError, match="shape"):
        fitted(torch.randn(5, 3), 0.5)
    with pytest.raises(ValueError, match="sigma"):
        fitted(x, torch.ones(4))
    pred = fitted.predict(x.numpy(), 0.5)
    assert isinstance(pred, np.ndarray) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, fitted(x, 0.5).detach().numpy(), rtol=1e-6)


def test_vjp_through_denoiser(fitted: MLPDenoiser) -> None:
    x = torch.randn(4, 2, requires_grad=True)
    sigma = torch.full((4,), 0.7)
    out = fitted(x, sigma)
    v = torch.randn(4, 2)
    (vjp,) = torch.autograd.grad(out, x, v)
    assert vjp.shape == (4, 2) and torch.isfinite(vjp).all()
    # against finite differences of <v, D(x)>
    eps = 1e-3
    e = torch.zeros(4, 2)
    e[:, 0] = eps
    with torch.no_grad():
        fd = ((fitted(x + e, sigma) - fitted(x - e, sigma)) * v).sum(1) / (2 * eps)
    torch.testing.assert_close(vjp[:, 0], fd, atol=2e-2, rtol=2e-2)


def test_untrained_backbone_gives_gaussian_denoiser() -> None:
    # zero-initialised output: D(x_t, sigma) = c_skip x_t, exact for N(0, sigma_data^2 I)
    net = MLPDenoiser(sigma_data=0.5, **SMALL).initialize_for(3)
    x = torch.randn(6, 3)
    torch.testing.assert_close(net(x, 2.0), x * 0.25 / (4.0 + 0.25))


def test_unet_shapes() -> None:
    x8 = torch.randn(64, 64)
    net = UNetDenoiser(
        image_shape=(1, 8, 8), max_epochs=1, batch_size=32, module__channels=(8, 16), random_state=0
    ).fit(x8)
    assert net(x8[:3], torch.tensor([0.1, 1.0, 10.0])).shape == (3, 64)
    assert net.n_features_in_ == 64
    # 32x32 RGB and odd sizes, three levels, attention
    for shape, chans, attn in [
        ((3, 32, 32), (8, 16), False),
        ((1, 28, 28), (8, 8, 16), True),
        ((2, 9, 13), (8, 16), True),
    ]:
        d = int(np.prod(shape))
        m = UNet(d, shape, channels=chans, attention=attn)
        out = m(torch.randn(2, d), torch.zeros(2))
        assert out.shape == (2, d)
    with pytest.raises(ValueError, match="too small"):
        UNet(16, (1, 4, 4), channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="C\\*H\\*W"):
        UNet(10, (1, 4, 4))
    with pytest.raises(ValueError, match=r"\(n_samples, 64\)"):
        UNetDenoiser(image_shape=(1, 8, 8)).fit(torch.randn(4, 63))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="2-D"):
        MLPDenoiser(**SMALL).fit(np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        MLPDenoiser(**SMALL).fit(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="lr_schedule"):
        MLPDenoiser(lr_schedule="linear", **SMALL).fit(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="infers the input size"):
        MLPDenoiser(**SMALL).initialize()


# ---------------------------------------------------------------- learning


def test_learns_gaussian_tweedie_mean() -> None:
    X, mu, s = _gaussian(2048)
    net = MLPDenoiser(
        max_epochs=24,
        batch_size=128,
        lr=3e-3,
        random_state=1,
        module__hidden_features=64,
        module__n_blocks=2,
        module__emb_features=32,
    )
    untrained = clone(net).initialize_for(2)
    net.fit(X)
    # the denoising loss (fixed noise) drops well below the untrained net's
    loss0 = untrained.loss(X, generator=torch.Generator().manual_seed(0))
    loss1 = net.loss(X, generator=torch.Generator().manual_seed(0))
    assert loss1 < 0.75 * loss0, (loss0, loss1)

    g = torch.Generator().manual_seed(5)
    x0, _, _ = _gaussian(1000, seed=9)
    # (sigma, max relative error, max ratio to the untrained net's error)
    for sigma, tol, ratio in [
        (0.3, 0.05, 0.5),
        (1.0, 0.15, 0.25),
        (3.0, 0.2, 0.25),
        (10.0, 0.15, 0.25),
    ]:
        x_t = x0 + sigma * torch.randn(x0.shape, generator=g)
        exact = mu + s**2 / (s**2 + sigma**2) * (x_t - mu)
        with torch.no_grad():
            err = (net(x_t, sigma) - exact).norm() / exact.norm()
            err0 = (untrained(x_t, sigma) - exact).norm() / exact.norm()
        assert err < tol, (sigma, float(err))
        assert err < ratio * err0, (sigma, float(err), float(err0))


def test_loss_helper_is_deterministic(fitted: MLPDenoiser) -> None:
    X, _, _ = _gaussian(300, seed=3)
    a = fitted.loss(X, generator=torch.Generator().manual_seed(0))
    b = fitted.loss(X, generator=torch.Generator().manual_seed(0))
    c = fitted.loss(X, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c and np.isfinite(a)
    assert np.isfinite(fitted.loss(X, sigma=0.5))
    assert np.isfinite(fitted.loss(X, sigma=np.ones(300)))


def test_reproducible_with_random_state() -> None:
    X, _, _ = _gaussian(256)
    a = MLPDenoiser(max_epochs=2, batch_size=64, random_state=3, **SMALL).fit(X)
    b = MLPDenoiser(max_epochs=2, batch_size=64, random_state=3, **SMALL).fit(X)
    c = MLPDenoiser(max_epochs=2, batch_size=64, random_state=4, **SMALL).fit(X)
    assert torch.equal(_params(a.module_), _params(b.module_))
    assert not torch.equal(_params(a.module_), _params(c.module_))


# ---------------------------------------------------------------- warm start, EMA, clipping


def test_partial_fit_warm_starts() -> None:
    X, _, _ = _gaussian(512)
    kw = {"max_epochs": 4, "batch_size": 64, "lr": 3e-3, "random_state": 0, **SMALL}
    net = MLPDenoiser(**kw)
    untrained = clone(net).initialize_for(2)

    def fixed_loss(n: MLPDenoiser) -> float:
        return n.loss(X, generator=torch.Generator().manual_seed(0))

    net.fit(X)
    loss_fit = fixed_loss(net)
    w1 = _params(net.module_).clone()
    net.partial_fit(X)
    assert len(net.history) == 8
    # continues from the trained weights (a re-initialised net would be back at loss0)
    assert fixed_loss(net) < loss_fit < 0.85 * fixed_loss(untrained)
    assert net.optimizer_.state[next(iter(net.module_.parameters()))]["step"] == 8 * 8
    assert not torch.equal(_params(net.module_), w1)
    fresh = MLPDenoiser(**kw).fit(X)
    assert torch.equal(_params(fresh.module_), w1)  # same seed: reproduces the first fit
    assert not torch.equal(_params(fresh.module_), _params(net.module_))
    # the cosine schedule restarts per call and the base lr is restored afterwards
    assert net.history[-1, "lr"] < 0.2 * net.lr
    assert net.optimizer_.param_groups[0]["lr"] == net.lr
    # warm_start=True makes fit continue too
    net.set_params(warm_start=True)
    net.fit(X)
    assert len(net.history) == 12


def test_ema_weights_are_used_and_pickled() -> None:
    X, _, _ = _gaussian(512)
    net = MLPDenoiser(max_epochs=3, batch_size=64, ema_decay=0.9, random_state=0, **SMALL)
    net.fit(X)
    assert not torch.equal(_params(net.ema_module_), _params(net.module_))
    x = torch.randn(7, 2)
    sigma = torch.full((7,), 0.5)
    with torch.no_grad():
        raw = net._denoise(net.module_, x, sigma)
        ema = net._denoise(net.ema_module_, x, sigma)
        out = net(x, sigma)
    assert torch.equal(out, ema) and not torch.allclose(out, raw)
    assert all(not p.requires_grad for p in net.ema_module_.parameters())
    # the optimizer only trains module_
    opt_params = {id(p) for g in net.optimizer_.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in net.module_.parameters()}
    loaded = pickle.loads(pickle.dumps(net))
    assert torch.equal(loaded(x, sigma), out)
    # disabling EMA falls back to the raw weights
    net.set_params(ema_decay=None)
    assert torch.equal(net(x, sigma), raw)
    # switching it on for a fitted net starts the average from the current weights
    plain = MLPDenoiser(max_epochs=1, batch_size=64, random_state=0, **SMALL).fit(X)
    assert getattr(plain, "ema_module_", None) is None
    plain.set_params(ema_decay=0.5).partial_fit(X)
    assert int(plain.ema_module_.n_averaged) == 8
    assert not torch.equal(_params(plain.ema_module_), _params(plain.module_))


def test_ema_restart_averages_the_current_call_only() -> None:
    X, _, _ = _gaussian(512)
    kwargs = dict(max_epochs=2, batch_size=64, ema_decay=0.99, random_state=0, **SMALL)
    restarted = MLPDenoiser(ema_restart=True, **kwargs).fit(X)
    continued = MLPDenoiser(**kwargs).fit(X)
    # the first call is the same either way
    assert torch.equal(_params(restarted.ema_module_), _params(continued.ema_module_))
    # after a restart, what the average held before the call no longer matters
    corrupted = copy.deepcopy(restarted)
    with torch.no_grad():
        for p in corrupted.ema_module_.parameters():
            p.fill_(1e3)
    restarted.partial_fit(X)
    corrupted.partial_fit(X)
    assert torch.equal(_params(restarted.ema_module_), _params(corrupted.ema_module_))
    assert int(restarted.ema_module_.n_averaged) == 16
    # without it, the average continues across calls
    continued.partial_fit(X)
    assert int(continued.ema_module_.n_averaged) == 32
    assert not torch.equal(_params(continued.ema_module_), _params(restarted.ema_module_))
    with pytest.raises(ValueError, match="ema_restart"):
        MLPDenoiser(ema_restart="yes", **SMALL).fit(X)


def test_gradient_clipping_bounds_the_step() -> None:
    X, _, _ = _gaussian(256)
    clip = 1e-3
    net = MLPDenoiser(
        max_epochs=1,
        batch_size=256,
        optimizer=torch.optim.SGD,
        lr=1.0,
        lr_schedule="constant",
        clip_grad_norm=clip,
        random_state=0,
        **SMALL,
    )
    net.initialize_for(2)
    before = _params(net.module_).clone()
    net.set_params(warm_start=True).fit(X)
    step = (_params(net.module_) - before).norm()
    assert net.history[-1, "batches", 0, "grad_norm"] > 10 * clip
    assert step <= clip * (1 + 1e-4)
    assert step >= clip * 0.99


# ---------------------------------------------------------------- callbacks, divergence


def test_skorch_callbacks(tmp_path) -> None:
    X, _, _ = _gaussian(256)
    net = MLPDenoiser(
        max_epochs=30,
        batch_size=128,
        random_state=0,
        callbacks=[
            ProgressBar(),
            EarlyStopping(monitor="train_loss", patience=2, threshold=10.0),
            Checkpoint(monitor="train_loss_best", dirname=str(tmp_path)),
        ],
        **SMALL,
    )
    net.fit(X)
    assert len(net.history) == 3  # stopped early
    assert (tmp_path / "params.pt").exists()
    assert net.optimizer_.param_groups[0]["lr"] == net.lr


class _InjectInf(Callback):
    """Sets a weight to inf at the first batch of epoch ``epoch`` and records the state
    at the end of the previous epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, net, **kwargs) -> None:
        if len(net.history) == self.epoch - 1:
            self.good_ = _params(net.module_).clone()

    def on_batch_begin(self, net, batch=None, training=None, **kwargs) -> None:
        if len(net.history) == self.epoch and training:
            with torch.no_grad():
                next(iter(net.module_.parameters())).view(-1)[0] = float("inf")


def test_divergence_restores_last_good_weights() -> None:
    X, _, _ = _gaussian(256)
    hook = _InjectInf(epoch=3)
    net = MLPDenoiser(max_epochs=5, batch_size=64, random_state=0, callbacks=[hook], **SMALL)
    with pytest.raises(DivergenceError, match="diverged at epoch 3"):
        net.fit(X)
    assert torch.equal(_params(net.module_), hook.good_)
    assert len(net.history) == 2  # the failed epoch is dropped
    assert torch.isfinite(net(torch.randn(3, 2), 1.0)).all()
    assert issubclass(DivergenceError, FloatingPointError)
    assert issubclass(DivergenceError, RuntimeError)


def test_huge_learning_rate_diverges_cleanly() -> None:
    X, _, _ = _gaussian(256)
    net = MLPDenoiser(
        max_epochs=5,
        batch_size=64,
        optimizer=torch.optim.SGD,
        lr=1e12,
        clip_grad_norm=None,
        lr_schedule="constant",
        random_state=0,
        **SMALL,
    )
    with pytest.raises(DivergenceError):
        net.fit(X)
    assert torch.isfinite(_params(net.module_)).all()


# ---------------------------------------------------------------- sklearn, pickle, devices


class _Holder(BaseEstimator):
    def __init__(self, denoiser=None) -> None:
        self.denoiser = denoiser


def test_clone_get_params_and_nested_set_params(fitted: MLPDenoiser) -> None:
    params = MLPDenoiser().get_params()
    for key in (
        "lr",
        "max_epochs",
        "batch_size",
        "sigma_min",
        "sigma_max",
        "sigma_data",
        "ema_decay",
        "clip_grad_norm",
        "lr_schedule",
        "random_state",
        "device",
        "module__hidden_features",
        "module__n_blocks",
        "module__emb_features",
    ):
        assert key in params, key
    assert params["module"] is MLP and params["module__hidden_features"] == 256
    assert UNetDenoiser(image_shape=(3, 8, 8)).get_params()["module__channels"] == (32, 64)

    c = clone(fitted)
    assert not c.initialized_ and c.get_params()["module__hidden_features"] == 32
    holder = _Holder(MLPDenoiser(max_epochs=1, **SMALL))
    holder = clone(holder).set_params(
        denoiser__lr=5e-4, denoiser__module__hidden_features=8, denoiser__max_epochs=2
    )
    holder.denoiser.fit(torch.randn(64, 2))
    assert holder.denoiser.module_.input.out_features == 8
    assert len(holder.denoiser.history) == 2
    assert holder.denoiser.optimizer_.param_groups[0]["lr"] == 5e-4
    assert isinstance(holder.denoiser, Denoiser)


def test_pickle_and_joblib_round_trip(fitted: MLPDenoiser) -> None:
    x = torch.randn(9, 2)
    sigma = torch.logspace(-2, 1, 9)
    expected = fitted(x, sigma)
    for loaded in (pickle.loads(pickle.dumps(fitted)), _joblib_round_trip(fitted)):
        assert torch.equal(loaded(x, sigma), expected)
        loaded.partial_fit(torch.randn(64, 2))  # still trainable


def _joblib_round_trip(obj):
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return joblib.load(buf)


@contextlib.contextmanager
def _saved_as_cuda(net: Denoiser) -> Iterator[None]:
    """Inside the block, torch serialises the net's weights, EMA weights and optimizer state
    with the storage location ``"cuda:0"``, byte for byte what a net trained on a GPU writes;
    other tensors (the CPU generator) keep ``"cpu"``. Loading such bytes without a
    ``map_location`` fails on a machine without CUDA."""
    states = [net.module_.state_dict(), net.optimizer_.state_dict()]
    if net.ema_module_ is not None:
        states.append(net.ema_module_.state_dict())
    pointers = set()
    for state in states:
        for value in _tensors(state):
            pointers.add(value.untyped_storage().data_ptr())
    net.device = "cuda"

    def tagger(storage):
        return "cuda:0" if storage.data_ptr() in pointers else None

    entry = (-1, tagger, lambda storage, location: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)
        net.device = "cpu"


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading without CUDA")
@pytest.mark.parametrize("kind", ["mlp", "unet", "transformer"])
def test_net_saved_on_cuda_loads_on_cpu(kind: str, tmp_path) -> None:
    X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    net = _small_nets(max_epochs=1, batch_size=32, ema_decay=0.9, random_state=0)[kind].fit(X)
    x = torch.randn(4, 16)
    expected = net(x, 0.3)
    with _saved_as_cuda(net):
        blob = pickle.dumps(net)
        joblib.dump(net, tmp_path / "net.joblib")
        net.save_params(f_params=tmp_path / "module.pt", f_optimizer=tmp_path / "opt.pt")
    # the simulation is faithful: the bytes name a CUDA device
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "module.pt", weights_only=True)
    for load in (lambda: pickle.loads(blob), lambda: joblib.load(tmp_path / "net.joblib")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load()
        assert any("not available" in str(w.message) for w in caught)
        assert loaded.device == "cpu"
        assert torch.equal(loaded(x, 0.3), expected)
        for module in (loaded.module_, loaded.ema_module_):
            assert next(module.parameters()).device.type == "cpu"
        loaded.partial_fit(torch.randn(32, 16))  # optimizer state on the CPU too
        moved = loaded.to("cpu")
        assert moved is loaded and next(moved.module_.parameters()).device.type == "cpu"
    # skorch's save_params / load_params into a fresh CPU net
    fresh = clone(net).initialize_for(16)
    fresh.load_params(f_params=tmp_path / "module.pt", f_optimizer=tmp_path / "opt.pt")
    torch.testing.assert_close(_params(fresh.module_), _params(net.module_))


def test_validation_split_records_valid_loss() -> None:
    from skorch.dataset import ValidSplit

    X, _, _ = _gaussian(256)
    net = MLPDenoiser(
        max_epochs=2, batch_size=64, train_split=ValidSplit(4), random_state=0, **SMALL
    ).fit(X)
    assert np.isfinite(net.history[-1, "valid_loss"])


@pytest.mark.slow
def test_unet_learns_correlated_gaussian_images() -> None:
    # x = mu + L z on 8x8 images with a smooth covariance: the Tweedie mean is
    # mu + Sigma (Sigma + sigma^2 I)^{-1} (x_t - mu)
    g = torch.Generator().manual_seed(0)
    side = 8
    coords = torch.stack(
        torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1
    ).reshape(-1, 2)
    dist2 = (coords[:, None, :] - coords[None, :, :]).float().square().sum(-1)
    cov = torch.exp(-dist2 / 8.0) + 1e-4 * torch.eye(side * side)
    chol = torch.linalg.cholesky(cov)
    mu = 0.5 * torch.sin(coords[:, 0].float())
    X = mu + torch.randn(2048, side * side, generator=g) @ chol.T
    net = UNetDenoiser(
        image_shape=(1, side, side),
        max_epochs=20,
        batch_size=64,
        lr=2e-3,
        module__channels=(16, 32),
        random_state=0,
    )
    untrained = clone(net).initialize_for(side * side)
    net.fit(X)
    x0 = mu + torch.randn(500, side * side, generator=g) @ chol.T
    for sigma in (0.5, 2.0):
        x_t = x0 + sigma * torch.randn(x0.shape, generator=g)
        gain = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(side * side))
        exact = mu + (x_t - mu) @ gain.T
        with torch.no_grad():
            err = (net(x_t, sigma) - exact).norm() / exact.norm()
            err0 = (untrained(x_t, sigma) - exact).norm() / exact.norm()
        assert err < 0.5 * err0, (sigma, float(err), float(err0))


# ---------------------------------------------------------------- transformer


def test_transformer_tokens_and_shapes() -> None:
    # patches of images (odd sizes padded) and groups of features round-trip exactly
    for features, shape, patch in [(64, (1, 8, 8), 2), (351, (3, 9, 13), 4), (7, None, 3)]:
        m = Transformer(features, shape, patch_size=patch, hidden_features=16, heads=2)
        x = torch.randn(3, features)
        tokens = m.tokens(x)
        assert tokens.shape[1] == int(np.prod(m.grid))
        assert torch.equal(m.untokens(tokens), x)
        assert m(x, torch.zeros(3)).shape == (3, features)
    # a token holds one patch: pixel (i, j) of an 8x8 image with p = 2 is entry
    # 2 * (i % 2) + (j % 2) of token 4 * (i // 2) + j // 2
    m = Transformer(64, (1, 8, 8), patch_size=2, hidden_features=16, heads=2)
    image = torch.arange(64.0).reshape(1, 64)
    assert m.tokens(image)[0, 4 * 1 + 2, 2 * 1 + 0] == 8 * 3 + 4
    with pytest.raises(ValueError, match="heads"):
        Transformer(64, (1, 8, 8), hidden_features=30, heads=4)
    with pytest.raises(ValueError, match="C\\*H\\*W"):
        Transformer(10, (1, 4, 4))
    with pytest.raises(ValueError, match="image_shape"):
        TransformerDenoiser(image_shape=(8, 8)).initialize()
    # untrained (zero-initialised output and gates): D = c_skip x_t
    net = TransformerDenoiser(sigma_data=0.5, **SMALL_TRANSFORMER).initialize_for(5)
    x = torch.randn(4, 5)
    torch.testing.assert_close(net(x, 2.0), x * 0.25 / (4.0 + 0.25))


def test_transformer_learns_gaussian_denoiser() -> None:
    X, mu, s = _gaussian(1024)
    net = TransformerDenoiser(
        max_epochs=12,
        batch_size=128,
        lr=3e-3,
        random_state=0,
        module__patch_size=1,
        **SMALL_TRANSFORMER,
    )
    untrained = clone(net).initialize_for(2)
    net.fit(X)
    g = torch.Generator().manual_seed(1)
    x0, _, _ = _gaussian(500, seed=4)
    for sigma in (0.5, 2.0):
        x_t = x0 + sigma * torch.randn(x0.shape, generator=g)
        exact = mu + s**2 / (s**2 + sigma**2) * (x_t - mu)
        with torch.no_grad():
            err = (net(x_t, sigma) - exact).norm() / exact.norm()
            err0 = (untrained(x_t, sigma) - exact).norm() / exact.norm()
        assert err < 0.5 * err0, (sigma, float(err), float(err0))


@pytest.mark.parametrize("kind", ["mlp", "unet", "transformer"])
def test_every_denoiser_clones_pickles_and_grid_searches(kind: str) -> None:
    from sklearn.model_selection import GridSearchCV

    X = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    net = _small_nets(max_epochs=1, batch_size=32, random_state=0)[kind]
    key = "module__emb_features"
    search = GridSearchCV(
        net,
        {key: [8, 16]},
        scoring=lambda est, X, y=None: -est.loss(X, generator=torch.Generator().manual_seed(0)),
        cv=2,
    ).fit(X.numpy())
    assert search.best_params_[key] in (8, 16)
    fitted = search.best_estimator_
    assert fitted.module_.embedding.mlp[0].out_features == search.best_params_[key]
    c = clone(fitted)
    assert not c.initialized_ and c.get_params()[key] == search.best_params_[key]
    x = torch.randn(5, 16)
    loaded = pickle.loads(pickle.dumps(fitted))
    assert torch.equal(loaded(x, 0.5), fitted(x, 0.5))


@pytest.mark.parametrize("kind", ["mlp", "unet", "transformer"])
def test_every_denoiser_is_searchable_inside_the_estimator(kind: str) -> None:
    from sklearn.model_selection import GridSearchCV

    from diffem import DiffusionPriorEM
    from diffem.operators import Identity
    from diffem.samplers import MMPS

    g = torch.Generator().manual_seed(0)
    Y = (0.5 * torch.randn(48, 16, generator=g) + 0.1 * torch.randn(48, 16, generator=g)).numpy()
    em = DiffusionPriorEM(
        denoiser=_small_nets(max_epochs=1, batch_size=16, random_state=0)[kind],
        sampler=MMPS(steps=2),
        n_iter=1,
        gaussian_iter=2,
        n_score_samples=1,
        score_steps=2,
        device="cpu",
        random_state=0,
    )
    key = "denoiser__module__emb_features"
    search = GridSearchCV(em, {key: [8, 16]}, cv=2, error_score="raise")
    search.fit(Y, Identity(16, noise_std=0.1).expand(len(Y)))
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    denoiser = search.best_estimator_.denoiser_
    assert isinstance(denoiser, type(em.denoiser))
    assert denoiser.module_.embedding.mlp[0].out_features == search.best_params_[key]


# ---------------------------------------------------------------- training-loop parts


def test_tensor_batches_cover_the_data_once_per_pass() -> None:
    from skorch.dataset import Dataset
    from torch.utils.data import Subset

    x = torch.arange(10.0)[:, None]
    g = torch.Generator().manual_seed(0)
    batches = TensorBatches(Dataset(x), batch_size=4, shuffle=True, generator=g)
    assert len(batches) == 3
    first = torch.cat([b for b, _ in batches])
    second = torch.cat([b for b, _ in batches])
    assert sorted(first[:, 0].tolist()) == list(range(10))
    assert not torch.equal(first, second)  # a fresh permutation per pass
    ordered = TensorBatches(Dataset(x), batch_size=4, drop_last=True)
    assert len(ordered) == 2 and torch.equal(torch.cat([b for b, _ in ordered]), x[:8])
    subset = TensorBatches(Subset(Dataset(x), [7, 2, 5]), batch_size=2)
    assert torch.equal(torch.cat([b for b, _ in subset]), x[[7, 2, 5]])
    # other DataLoader options: batches from a DataLoader
    loader = TensorBatches(Dataset(x), batch_size=4, num_workers=0)
    assert loader.loader is not None and len(loader) == 3


def test_cosine_schedule_per_batch_and_restored_learning_rate() -> None:
    class _RecordLR(Callback):
        def on_batch_begin(self, net, training=None, **kwargs) -> None:
            if training:
                self.lrs.append(net.optimizer_.param_groups[0]["lr"])

    X, _, _ = _gaussian(200)
    hook = _RecordLR()
    hook.lrs = []
    net = MLPDenoiser(max_epochs=3, batch_size=64, lr=0.01, callbacks=[hook], **SMALL).fit(X)
    total = 3 * 4  # 4 batches of 200 rows per epoch
    expected = [0.005 * (1 + np.cos(np.pi * k / total)) for k in range(total)]
    np.testing.assert_allclose(hook.lrs, expected, rtol=1e-6)
    assert net.optimizer_.param_groups[0]["lr"] == 0.01
    hook.lrs = []
    net.partial_fit(X[:100])  # a warm restart over this call's 2 x 3 batches
    np.testing.assert_allclose(hook.lrs, [0.005 * (1 + np.cos(np.pi * k / 6)) for k in range(6)])
    hook.lrs = []
    net.set_params(lr_schedule="constant", lr=0.02).partial_fit(X)
    assert hook.lrs == [0.02] * total
    # with a validation split the schedule spans the training part's batches
    from skorch.dataset import ValidSplit

    hook.lrs = []
    net.set_params(lr_schedule="cosine", train_split=ValidSplit(2)).partial_fit(X)
    assert len(hook.lrs) == 3 * 2 and hook.lrs[-1] > 0
    np.testing.assert_allclose(hook.lrs[-1], 0.01 * (1 + np.cos(np.pi * 5 / 6)))


def test_fused_optimizer_by_default_unless_chosen() -> None:
    X, _, _ = _gaussian(64)
    net = MLPDenoiser(max_epochs=1, **SMALL).fit(X)
    assert net.optimizer_.defaults["fused"] is True
    net = MLPDenoiser(max_epochs=1, optimizer__foreach=False, **SMALL).fit(X)
    assert not net.optimizer_.defaults["fused"] and net.optimizer_.defaults["foreach"] is False
    net = MLPDenoiser(max_epochs=1, optimizer=torch.optim.RMSprop, **SMALL).fit(X)
    assert net.optimizer_.defaults["foreach"] is True


def test_warmup_ema_update() -> None:
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=WarmupEMA(0.5))
    expected = None
    for k, w in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update_parameters(model)
        # the first update copies; then decay min(0.5, (1 + k) / (10 + k)) after k updates
        decay = min(0.5, (1 + k) / (10 + k))
        expected = w if k == 0 else decay * expected + (1 - decay) * w
        assert ema.module.weight.item() == pytest.approx(expected)
    assert pickle.loads(pickle.dumps(ema)).multi_avg_fn.decay == 0.5


def test_training_noise_level_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    n = 20000
    uniform = MLPDenoiser().sample_sigma(n, g).log()
    low, high = np.log(1e-3), np.log(1e2)
    assert low <= uniform.min() and uniform.max() <= high
    # log-uniform: mean (low + high) / 2, std (high - low) / sqrt(12); 5 standard errors
    width = high - low
    assert abs(uniform.mean() - (low + high) / 2) < 5 * width / np.sqrt(12 * n)
    assert abs(uniform.std() - width / np.sqrt(12)) < 0.02 * width
    normal = MLPDenoiser(sigma_distribution="log_normal", log_sigma_std=1.0).sample_sigma(n, g)
    log_normal = normal.log()
    # the truncation at +-5.8 standard deviations is invisible at this sample size
    assert abs(log_normal.mean() - (low + high) / 2) < 5 / np.sqrt(n)
    assert abs(log_normal.std() - 1.0) < 0.02
    shifted = MLPDenoiser(sigma_distribution="log_normal", log_sigma_mean=-4.0, log_sigma_std=2.0)
    drawn = shifted.sample_sigma(n, g).log()
    assert low <= drawn.min() and drawn.max() <= high  # truncated to the schedule
    from scipy.stats import truncnorm

    exact = truncnorm((low + 4.0) / 2.0, (high + 4.0) / 2.0, loc=-4.0, scale=2.0)
    assert abs(drawn.mean() - exact.mean()) < 5 * exact.std() / np.sqrt(n)
    assert abs(drawn.std() - exact.std()) < 0.02 * exact.std()
    X, _, _ = _gaussian(64)
    net = MLPDenoiser(max_epochs=1, sigma_distribution="log_normal", **SMALL).fit(X)
    assert np.isfinite(net.history[-1, "train_loss"])
    assert clone(net).get_params()["sigma_distribution"] == "log_normal"
    for bad in [{"sigma_distribution": "normal"}, {"log_sigma_std": 0.0}, {"log_sigma_mean": "a"}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            MLPDenoiser(**bad, **SMALL).fit(X)


def test_fresh_optimizer_and_learning_rate_between_calls() -> None:
    X, _, _ = _gaussian(128)
    net = MLPDenoiser(max_epochs=1, batch_size=64, ema_decay=0.9, random_state=0, **SMALL).fit(X)
    weights, ema = _params(net.module_).clone(), _params(net.ema_module_).clone()
    assert net.optimizer_.state  # moment estimates after training
    net.initialize_optimizer()
    assert not net.optimizer_.state and net.optimizer_.defaults["fused"] is True
    assert torch.equal(_params(net.module_), weights)
    assert torch.equal(_params(net.ema_module_), ema)
    net.set_params(lr=0.01).partial_fit(X)
    assert net.optimizer_.param_groups[0]["lr"] == 0.01
    assert net.history[-1, "lr"] < 0.01 and int(net.ema_module_.n_averaged) == 4
