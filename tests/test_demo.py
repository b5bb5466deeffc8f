"""The demo's ``--quick`` path end to end: table printed, figures written, metrics finite."""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch

from diffem.__main__ import main

FIGURES = ("pairs.png", "corner_final.png", "metrics.png", "evidence.png", "posterior.png")


@pytest.mark.timeout(300)
def test_demo_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)  # the CLI sets it for the whole process
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out

    for name in FIGURES:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, name
    for column in (
        "iteration",
        "log evidence",
        "evidence change",
        "train loss",
        "E-step s",
        "M-step s",
        "sliced W2",
        "Sinkhorn",
    ):
        assert column in out
    assert "kept prior: EM iteration" in out
    assert (tmp_path / "table.md").read_text().count("\n") >= 4

    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == list(range(len(rows)))
    assert len(rows) >= 2  # Gaussian initialisation and at least one EM iteration
    for r in rows:
        assert math.isfinite(float(r["sliced W2"])) and float(r["sliced W2"]) >= 0
        assert math.isfinite(float(r["Sinkhorn"]))
    for r in rows[1:]:
        assert math.isfinite(float(r["train loss"]))
        assert math.isfinite(float(r["log evidence"])) and float(r["± se"]) > 0
    # the budget of the quick path is 60 s on 2 CPU cores; leave room for a loaded machine
    assert seconds < 180, f"the quick demo took {seconds:.0f} s"


def test_cli_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_config_is_the_recipe():
    from diffem.demo import DemoConfig, build_estimator

    full = build_estimator(DemoConfig.full(), verbose=0)
    assert full.sampler is None and full.evidence_sampler is None  # the recipe's samplers
    assert full.keep_best and full.tol is not None
    quick = build_estimator(DemoConfig.quick(cg_iter=2), verbose=0)
    assert (quick.sampler.steps, quick.sampler.particles, quick.sampler.cg_iter) == (8, 4, 2)
