"""The toy landscape of paper Fig. 5: its loss, the paths, and `python -m genie_dg.toy`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from genie_dg.diagnostics import toy


def test_each_source_domain_has_its_minimum_where_documented():
    for domain, centre in enumerate(toy.DOMAIN_MINIMA):
        point = torch.tensor(centre, dtype=torch.float64, requires_grad=True)
        loss = toy.domain_loss(point, domain)
        (gradient,) = torch.autograd.grad(loss, point)
        assert float(loss.detach()) == 0.0 and float(gradient.abs().max()) == 0.0
        # The average loss has a local minimum near each domain's: descent from there stays.
        theta = point.detach().clone().requires_grad_(True)
        for _ in range(200):
            (gradient,) = torch.autograd.grad(toy.average_loss(theta), theta)
            theta = (theta - 0.5 * gradient).detach().requires_grad_(True)
        assert float((theta - point).detach().norm()) < 0.5


def test_paths_start_at_minus_one_three_take_30_steps_and_are_reproducible():
    paths = toy.optimization_paths(seed=0)
    assert list(paths) == ["SGD", "Adam", "SAM", "GENIE"]
    for path in paths.values():
        assert path.shape == (31, 2)
        assert path[0].tolist() == [-1.0, 3.0]
        assert torch.isfinite(path).all()
        assert float(toy.average_loss(path[-1])) < float(toy.average_loss(path[0]))
    again = toy.optimization_paths(seed=0)
    assert all(torch.equal(paths[name], again[name]) for name in paths)
    # SAM differs from SGD only by where its gradient is taken.
    assert not torch.equal(paths["SAM"], paths["SGD"])
    assert not torch.equal(toy.optimization_paths(seed=1)["GENIE"], paths["GENIE"])


@pytest.mark.e2e  # python -m in a process of its own
def test_module_command_writes_the_figure(tmp_path):
    out = tmp_path / "figures" / "toy.png"
    result = subprocess.run(
        [sys.executable, "-m", "genie_dg.toy", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    for name in ("SGD", "Adam", "SAM", "GENIE"):
        assert f"{name}: ends at" in result.stdout
