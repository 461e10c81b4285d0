"""Property tests: finite gradients never produce NaN/inf, and both implementations agree."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genie_dg.optim import GENIE

shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)
hparams = st.fixed_dictionaries(
    {
        "lr": st.floats(0.0, 1.0),
        "beta": st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.999]) | st.floats(0.0, 0.999),
        "p": st.floats(0.0, 0.9),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
        "decoupled_weight_decay": st.booleans(),
        "eps": st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
        "variant": st.sampled_from(["reference", "algorithm1"]),
        "preconditioning": st.booleans(),
        "noise": st.booleans(),
        "mask": st.booleans(),
        "noise_std": st.sampled_from([0.0, 1e-3, 1.0]),
        "maximize": st.booleans(),
    }
)
# Gradient scales from exactly zero to large (|g| up to 1e6; squares stay finite in float32).
scales = st.lists(st.sampled_from([0.0, 1e-30, 1e-6, 1e-2, 1.0, 1e3, 1e6]), min_size=1, max_size=4)


@settings(max_examples=50, deadline=None)
@given(
    shapes=shapes,
    hp=hparams,
    scales=scales,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_finite_gradients_never_produce_nonfinite_values(shapes, hp, scales, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
    runs = []
    for foreach in (True, False):
        params = [x.clone().requires_grad_(True) for x in init]
        runs.append((params, GENIE(params, seed=seed, foreach=foreach, **hp)))
    for scale in scales:
        grads = []
        for sh in shapes:
            g = torch.randn(sh, generator=gen) * scale
            # some exact zeros and some constant coordinates
            g = torch.where(torch.rand(sh, generator=gen) < 0.2, torch.zeros(()), g)
            grads.append(g.to(dtype))
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    (pa, oa), (pb, ob) = runs
    for x, y in zip(pa, pb):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)
        for key in ("m", "s"):
            assert torch.isfinite(oa.state[x][key]).all()
            assert torch.equal(oa.state[x][key], ob.state[y][key])
    for stats in oa.statistics():
        assert 0.0 <= stats["noise_active_fraction"] <= 1.0
        assert stats["precond_mean"] >= 0.0
