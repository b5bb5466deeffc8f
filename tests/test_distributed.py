"""Data-parallel EM with torch.distributed: the sharding arithmetic (property tests), the
collectives in two gloo processes, the launcher detection (the CUDA/NCCL path simulated: this
suite runs without a GPU), and an unchanged fit script launched with ``torchrun`` on two
processes against the same script in one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from diffem import DiffusionPriorEM
from diffem.em import distributed as dp
from diffem.em.distributed import DataParallel, GradientAllReduce, resolve_data_parallel
from diffem.operators import Mask
from diffem.priors import GaussianPrior

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LAUNCHER = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}


# ---------------------------------------------------------------------- sharding arithmetic
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 9))
def test_e_step_shards_are_contiguous_and_balanced(n: int, world: int) -> None:
    shards = [DataParallel(r, world, CPU).shard(n) for r in range(world)]
    rows = np.concatenate([np.arange(n)[s] for s in shards])
    np.testing.assert_array_equal(rows, np.arange(n))  # all rows, in order, once
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_m_step_parts_are_equal_and_cover_the_samples(n: int, world: int, seed: int) -> None:
    parts = [DataParallel(r, world, CPU).m_step_rows(n, seed) for r in range(world)]
    size = -(-n // world)
    assert all(len(p) == size for p in parts)  # the same number of mini-batches on every rank
    assert set(torch.cat(parts).tolist()) == set(range(n))
    if n % world == 0:
        assert sorted(torch.cat(parts).tolist()) == list(range(n))  # a partition, no padding


# ---------------------------------------------------------------------- collectives, 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        group = DataParallel(rank, world, CPU)
        n = 7
        mine = torch.arange(n, dtype=torch.float32)[group.shard(n)].reshape(-1, 1) * 10
        gathered = group.all_gather_rows(mine, n)
        seed = group.broadcast_int(1000 + rank)
        draws = torch.rand(3, generator=group.rank_generator(torch.Generator().manual_seed(5)))
        # gradient averaging on a tiny module, each rank with its own gradient
        module = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(module.weight, float(rank))
        group.broadcast_module(module)
        module.weight.grad = torch.full_like(module.weight, float(rank + 1))
        module.bias.grad = torch.full_like(module.bias, 2.0 * (rank + 1))
        GradientAllReduce().on_grad_computed(None, list(module.named_parameters()))
        torch.save(
            {
                "gathered": gathered,
                "seed": seed,
                "draws": draws,
                "weight": module.weight.detach().clone(),
                "grads": (module.weight.grad.clone(), module.bias.grad.clone()),
            },
            os.path.join(out, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_collectives_in_two_gloo_processes(tmp_path: Path) -> None:
    mp.start_processes(
        _collectives, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    expected = torch.arange(7, dtype=torch.float32).reshape(-1, 1) * 10
    for result in (r0, r1):
        torch.testing.assert_close(result["gathered"], expected)  # row order kept
        assert result["seed"] == 1000  # rank 0's value everywhere
        torch.testing.assert_close(result["weight"], torch.zeros(1, 2))  # rank 0's weights
        torch.testing.assert_close(result["grads"][0], torch.full((1, 2), 1.5))  # (1 + 2) / 2
        torch.testing.assert_close(result["grads"][1], torch.full((1,), 3.0))
    assert not torch.equal(r0["draws"], r1["draws"])  # independent streams per rank


def test_gradient_all_reduce_is_inert_without_a_process_group() -> None:
    module = torch.nn.Linear(2, 1)
    module.weight.grad = torch.ones_like(module.weight)
    GradientAllReduce().on_grad_computed(None, list(module.named_parameters()))
    torch.testing.assert_close(module.weight.grad, torch.ones(1, 2))


# ---------------------------------------------------------------------- launcher detection
def test_no_launcher_means_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    assert resolve_data_parallel("auto", CPU) is None
    assert resolve_data_parallel(False, CPU) is None
    with pytest.raises(ValueError, match="torchrun"):
        resolve_data_parallel(True, CPU)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="distributed must be"):
            resolve_data_parallel(bad, CPU)
    with pytest.raises(ValueError, match="distributed must be"):
        DiffusionPriorEM(n_iter=0, distributed="always").fit(np.ones((4, 2), np.float32))


class _FakeProcessGroup:
    """Records ``init_process_group`` and answers the queries that follow it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, object]] = []
        self.initialized = False
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "init_process_group", self.init)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda: 1)
        monkeypatch.setattr(dp.atexit, "register", lambda f: self.calls.append(("atexit", f)))

    def init(self, backend: str) -> None:
        self.calls.append(("init", backend))
        self.initialized = True


@pytest.mark.parametrize("requested", ["cuda", "cpu"])
def test_launcher_environment_initialises_the_group(
    monkeypatch: pytest.MonkeyPatch, requested: str
) -> None:
    """torchrun's environment with CUDA (simulated: no GPU here) gives NCCL on
    ``cuda:LOCAL_RANK``; on the CPU, gloo."""
    for name, value in LAUNCHER.items():
        monkeypatch.setenv(name, value)
    fake = _FakeProcessGroup(monkeypatch)
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    group = resolve_data_parallel("auto", torch.device(requested))
    assert group is not None and (group.rank, group.world_size) == (1, 2)
    if requested == "cuda":
        assert group.device == torch.device("cuda", 1) and devices == [torch.device("cuda", 1)]
        assert fake.calls[0] == ("init", "nccl")
    else:
        assert group.device == CPU and devices == []
        assert fake.calls[0] == ("init", "gloo")
    assert fake.calls[1][0] == "atexit"  # destroyed at exit
    # an explicit device index is kept; an initialised group is reused, not re-initialised
    again = resolve_data_parallel(True, torch.device("cuda", 0))
    assert again.device == torch.device("cuda", 0) and len(fake.calls) == 2


def test_distributed_false_ignores_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in LAUNCHER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "init_process_group", pytest.fail)
    est = DiffusionPriorEM(n_iter=0, distributed=False).fit(np.eye(3, dtype=np.float32))
    assert est.n_features_in_ == 3


# ---------------------------------------------------------------------- torchrun, end to end
LOAD_AND_SAMPLE = textwrap.dedent(
    """
    import sys, joblib, numpy as np
    est = joblib.load(sys.argv[1])
    assert est.n_iter_ == 2
    np.save(sys.argv[2], est.sample(5, random_state=3))
    """
)


def _run(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in LAUNCHER:
        env.pop(name, None)
    subprocess.run(args, check=True, cwd=ROOT, env=env, timeout=900)


@pytest.mark.slow
def test_torchrun_two_processes_fit_like_one(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2`` on an unchanged fit script (``tests/distributed_fit.py``,
    gloo): both ranks end with the same weights; rank 0's pickle loads and samples in a fresh
    process; the prior's held-out mean log-evidence and covariance error match a one-process
    fit of the same data within the spread of one-process fits over seeds: with seeds 0, 1, 2
    the scores were -3.677, -3.607, -3.654 (sd 0.036 nats, so a difference of two fits has sd
    0.05) and the relative covariance errors 0.448, 0.426, 0.424 (the two-process fit: -3.671
    and 0.400; truth -3.600)."""
    script = str(ROOT / "tests" / "distributed_fit.py")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    _run([*torchrun, "--master-port", port, script, str(tmp_path / "two")], tmp_path)
    _run([sys.executable, script, str(tmp_path / "one")], tmp_path)

    rank0, rank1 = (joblib.load(tmp_path / "two" / f"rank{r}.joblib") for r in (0, 1))
    single = joblib.load(tmp_path / "one" / "rank0.joblib")
    weights0 = rank0.denoiser_.module_.state_dict()
    weights1 = rank1.denoiser_.module_.state_dict()
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert rank0.history_[-1]["sample_mean"] == rank1.history_[-1]["sample_mean"]
    # the pickle loads and samples in a plain process
    script_load = tmp_path / "load.py"
    script_load.write_text(LOAD_AND_SAMPLE)
    _run(
        [
            sys.executable,
            str(script_load),
            str(tmp_path / "two" / "rank0.joblib"),
            str(tmp_path / "s.npy"),
        ],
        tmp_path,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), rank0.sample(5, random_state=3))

    sys.path.insert(0, str(ROOT / "tests"))
    import distributed_fit

    data = distributed_fit.problem()
    Y = data["Y"][distributed_fit.N_TRAIN :]
    op = Mask(data["mask"][distributed_fit.N_TRAIN :], noise_std=distributed_fit.NOISE)
    truth = float(GaussianPrior(data["mean"], data["cov"]).log_evidence(Y, op).mean())

    def quality(est: DiffusionPriorEM) -> tuple[float, float, float]:
        values, std = est.score_samples(Y, op, return_std=True)
        x = est.sample(4000, random_state=0)
        cov_error = np.linalg.norm(np.cov(x.T) - data["cov"]) / np.linalg.norm(data["cov"])
        return float(values.mean()), float(np.sqrt((std**2).sum()) / len(values)), cov_error

    score2, se2, cov2 = quality(rank0)
    score1, se1, cov1 = quality(single)
    assert abs(score2 - truth) < 0.3 and abs(score1 - truth) < 0.3
    assert abs(score2 - score1) < 3 * np.hypot(0.05, np.hypot(se1, se2))
    assert abs(cov2 - cov1) < 0.1
