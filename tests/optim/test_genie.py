"""Tests of the GENIE optimizer against its update rule (docs/genie.md): hand-computed steps,
the switches, the API's behaviour."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from genie_dg.optim import GENIE

from helpers.genie_reference import RefGENIE, grads_sequence, pair, ref_direction, run_steps


# ---------------------------------------------------------------------------
# hand-computed steps
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("variant", ["reference", "algorithm1"])
@pytest.mark.parametrize(
    "switches, beta, eps",
    [
        ((True, True, True), 0.9, 1e-8),
        ((True, False, False), 0.9, 1e-8),
        ((False, True, True), 0.9, 1e-8),
        ((True, True, False), 0.9, 1e-8),
        ((True, True, True), 0.0, 1e-8),  # beta = 0: rho = 1, no variance estimate
        ((True, True, True), 0.9, 0.5),  # large eps makes the var guard visible in lam
    ],
)
def test_matches_line_by_line_reference(variant, switches, beta, eps, foreach):
    pre, noise, mask = switches
    init = [[0.5, -1.0, 2.0, 0.0], [0.25, -0.75, 1.5, 0.1]]
    # Large, varying gradients make var > 0.1 so lam < 1 and noise is active;
    # the last coordinate never gets a gradient (var = 0 -> guarded to eps).
    grads = [
        [[0.3, -2.0, 1.0, 0.0], [4.0, -1.0, 0.5, 0.0]],
        [[-1.5, 0.7, 3.0, 0.1], [-3.0, 2.0, 0.25, 0.0]],
        [[2.5, 1.2, -2.0, -0.4], [1.0, 0.0, -1.0, 0.0]],
        [[0.0, -0.3, 0.6, 1.0], [-2.0, 1.5, 2.0, 0.0]],
    ]
    hp = dict(
        lr=0.1, beta=beta, p=0.3, eps=eps, variant=variant, preconditioning=pre, noise=noise, mask=mask, noise_std=0.05
    )
    ref = RefGENIE(init, seed=7, **hp)
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in init]
    opt = GENIE(params, seed=7, foreach=foreach, **hp)
    for t, g in enumerate(grads, start=1):
        ref.step(g)
        for p, gg in zip(params, g):
            p.grad = torch.tensor(gg, dtype=torch.float64)
        opt.step()
        for p, want, m, s in zip(params, ref.theta, ref.m, ref.s):
            torch.testing.assert_close(
                p.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14, msg=f"theta at t={t}"
            )
            torch.testing.assert_close(opt.state[p]["m"], torch.tensor(m, dtype=torch.float64), rtol=1e-13, atol=0)
            torch.testing.assert_close(opt.state[p]["s"], torch.tensor(s, dtype=torch.float64), rtol=1e-13, atol=0)
            assert float(opt.state[p]["step"]) == t
    # Same number of draws in the same order: generator states agree.
    if noise or mask:
        assert torch.equal(opt._generators["cpu"].get_state(), ref.gen.get_state())
    else:
        assert opt._generators == {}


def test_first_step_by_hand_reference():
    """t = 1 spelled out: var = eps, lam = tanh(10), psi = (g^2+eps)/(g^2+eps+rho*eps) with rho = 1."""
    g, lr, eps = 0.2, 0.1, 1e-8
    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = GENIE([p], lr=lr, eps=eps, noise=False, mask=False)
    p.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()
    m_hat = g  # (1-beta) g / (1-beta)
    psi = (m_hat**2 + eps) / (m_hat**2 + eps + 1.0 * eps)
    want = 1.0 - lr * m_hat * psi * math.tanh(10.0)
    assert p.item() == pytest.approx(want, rel=1e-15)
    # t = 2 with a second gradient, spelled out.
    g2, beta = -0.6, 0.95
    p.grad = torch.tensor([g2], dtype=torch.float64)
    opt.step()
    m = beta * (1 - beta) * g + (1 - beta) * g2
    s = beta * (1 - beta) * g**2 + (1 - beta) * g2**2
    c = 1 - beta**2
    rho = (1 - beta) * (1 + beta**2) / ((1 + beta) * c)
    m_hat, s_hat = m / c, s / c
    var = (s_hat - m_hat**2) / (1 - rho)
    lam = math.tanh(min(1 / var, 10))
    psi = (m_hat**2 + eps) / (m_hat**2 + eps + rho * var)
    want = want - lr * m_hat * psi * lam
    assert var > 0.1 and lam < 1  # the interesting regime
    assert p.item() == pytest.approx(want, rel=1e-13)


def test_float32_matches_reference_with_mask():
    """float32 parameters: the float64 reference with the same float32 uniform draws."""
    init = [0.5, -1.0, 2.0, 0.0, 0.3]
    grads = [[0.3, -2.0, 1.0, 0.0, 0.2], [-1.5, 0.7, 3.0, 0.1, 0.2], [2.5, 1.2, -2.0, -0.4, 0.2]]
    lr, beta, p_drop, eps = 0.05, 0.95, 0.4, 1e-8
    p = torch.tensor(init, requires_grad=True)
    opt = GENIE([p], seed=3, lr=lr, noise=False)
    gen = torch.Generator().manual_seed(3)
    theta, m, s = list(init), [0.0] * 5, [0.0] * 5
    for t, g in enumerate(grads, start=1):
        p.grad = torch.tensor(g)
        opt.step()
        m = [beta * mj + (1 - beta) * gj for mj, gj in zip(m, g)]
        s = [beta * sj + (1 - beta) * gj**2 for sj, gj in zip(s, g)]
        d, _, _ = ref_direction(m, s, t, beta, eps, "reference", True)
        u = torch.rand(5, generator=gen, dtype=torch.float32).tolist()
        theta = [tj - lr * dj * (1.0 if uj > p_drop else 0.0) / (1 - p_drop) for tj, dj, uj in zip(theta, d, u)]
        torch.testing.assert_close(p.detach(), torch.tensor(theta, dtype=torch.float32), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# switches
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["reference", "algorithm1"])
def test_p_zero_equals_mask_off(variant):
    a, b = pair()
    oa = GENIE(a, p=0.0, mask=True, seed=1, variant=variant, lr=0.1)
    ob = GENIE(b, p=0.4, mask=False, seed=1, variant=variant, lr=0.1)
    seq = grads_sequence([(3, 4), (5,)], 5, seed=2, scale=3.0, dtype=torch.float32)
    run_steps(a, oa, seq)
    run_steps(b, ob, seq)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(oa._generators["cpu"].get_state(), ob._generators["cpu"].get_state())


def test_no_draws_when_noise_and_mask_off():
    a, _ = pair()
    opt = GENIE(a, noise=False, mask=False, seed=5)
    run_steps(a, opt, grads_sequence([(3, 4), (5,)], 3, seed=2, scale=3.0, dtype=torch.float32))
    assert opt._generators == {}


def test_mask_only_draws_uniform_per_param():
    a, _ = pair()
    opt = GENIE(a, noise=False, mask=True, seed=5)
    run_steps(a, opt, grads_sequence([(3, 4), (5,)], 2, seed=2, dtype=torch.float32))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        torch.rand(3, 4, generator=gen)
        torch.rand(5, generator=gen)
    assert torch.equal(opt._generators["cpu"].get_state(), gen.get_state())


def test_normal_draw_skipped_when_lam_is_one_everywhere():
    # Small, steady gradients: var << 0.1 so tanh rounds to 1 in float32.
    p = torch.zeros(6, requires_grad=True)
    opt = GENIE([p], seed=9, mask=False)
    for _ in range(3):
        p.grad = torch.full((6,), 1e-3)
        opt.step()
    assert opt._generators == {}
    # large varying gradients: normal draws happen
    q = torch.zeros(6, requires_grad=True)
    opt2 = GENIE([q], seed=9, mask=False)
    for k in range(3):
        q.grad = torch.tensor([5.0, -5.0, 3.0, -3.0, 1.0, 0.0]) * (-1) ** k
        opt2.step()
    assert "cpu" in opt2._generators


@pytest.mark.parametrize("variant", ["reference", "algorithm1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_switches_off_is_sgd_on_bias_corrected_momentum(variant, dtype):
    torch.manual_seed(0)
    p = torch.randn(7, dtype=dtype, requires_grad=True)
    theta = p.detach().clone()
    beta, lr = 0.9, 0.05
    opt = GENIE([p], lr=lr, beta=beta, preconditioning=False, noise=False, mask=False, variant=variant)
    m = torch.zeros_like(theta)
    for t, grads in enumerate(grads_sequence([(7,)], 4, seed=1, dtype=dtype), start=1):
        g = grads[0]
        p.grad = g.clone()
        opt.step()
        m = beta * m + (1 - beta) * g
        theta = theta - lr * m / (1 - beta**t)
        torch.testing.assert_close(p.detach(), theta)


def test_preconditioning_changes_the_step():
    a, b = pair()
    oa = GENIE(a, noise=False, mask=False, preconditioning=True, lr=0.1)
    ob = GENIE(b, noise=False, mask=False, preconditioning=False, lr=0.1)
    seq = grads_sequence([(3, 4), (5,)], 3, seed=4, scale=2.0, dtype=torch.float32)
    run_steps(a, oa, seq)
    run_steps(b, ob, seq)
    assert not torch.allclose(a[0], b[0])


def test_noise_changes_the_step_and_is_scaled_by_one_minus_lam():
    a, b = pair()
    oa = GENIE(a, noise=True, mask=False, lr=0.1, seed=0)
    ob = GENIE(b, noise=False, mask=False, lr=0.1, seed=0)
    seq = grads_sequence([(3, 4), (5,)], 4, seed=4, scale=3.0, dtype=torch.float32)
    run_steps(a, oa, seq)
    run_steps(b, ob, seq)
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_forms(decoupled):
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    theta = p.detach().clone()
    lr, wd, beta = 0.1, 0.3, 0.9
    opt = GENIE(
        [p],
        lr=lr,
        beta=beta,
        weight_decay=wd,
        decoupled_weight_decay=decoupled,
        preconditioning=False,
        noise=False,
        mask=False,
    )
    m = torch.zeros_like(theta)
    for t, grads in enumerate(grads_sequence([(5,)], 3, seed=1), start=1):
        g = grads[0]
        p.grad = g.clone()
        opt.step()
        if decoupled:
            theta = theta * (1 - lr * wd)
        else:
            g = g + wd * theta
        m = beta * m + (1 - beta) * g
        theta = theta - lr * m / (1 - beta**t)
        torch.testing.assert_close(p.detach(), theta)


def test_weight_decay_forms_differ():
    a, b = pair()
    oa = GENIE(a, weight_decay=0.5, decoupled_weight_decay=False, lr=0.1, seed=0)
    ob = GENIE(b, weight_decay=0.5, decoupled_weight_decay=True, lr=0.1, seed=0)
    seq = grads_sequence([(3, 4), (5,)], 2, seed=4, dtype=torch.float32)
    run_steps(a, oa, seq)
    run_steps(b, ob, seq)
    assert not torch.allclose(a[0], b[0])


@pytest.mark.parametrize("foreach", [False, True])
def test_maximize_equals_negated_gradient(foreach):
    a, b = pair()
    oa = GENIE(a, maximize=True, seed=3, foreach=foreach, lr=0.1)
    ob = GENIE(b, maximize=False, seed=3, foreach=foreach, lr=0.1)
    seq = grads_sequence([(3, 4), (5,)], 4, seed=4, scale=3.0, dtype=torch.float32)
    grads_before = [[g.clone() for g in gs] for gs in seq]
    run_steps(a, oa, seq)
    run_steps(b, ob, [[-g for g in gs] for gs in seq])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for gs, gb in zip(seq, grads_before):  # the caller's gradients are not modified
        assert all(torch.equal(x, y) for x, y in zip(gs, gb))


def test_maximize_ascends():
    p = torch.zeros(3, requires_grad=True)
    opt = GENIE([p], maximize=True, noise=False, mask=False, lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert (p > 0).all()


# ---------------------------------------------------------------------------
# API behaviour
# ---------------------------------------------------------------------------
def test_closure_called_with_grad_and_loss_returned():
    model = nn.Linear(3, 1)
    opt = GENIE(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert not torch.equal(before, model.weight)
    assert opt.step() is None


def test_params_without_grad_are_skipped():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    b_before = b.detach().clone()
    opt = GENIE([a, b], seed=0)
    a.grad = torch.randn(4)
    opt.step()
    assert torch.equal(b, b_before)
    assert b not in opt.state or len(opt.state[b]) == 0
    assert set(opt.state[a]) == {"step", "m", "s"}


@pytest.mark.parametrize("variant", ["reference", "algorithm1"])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradients_give_no_nan(variant, eps, foreach):
    p = torch.randn(4, 3, requires_grad=True)
    before = p.detach().clone()
    opt = GENIE([p], variant=variant, eps=eps, foreach=foreach)
    for _ in range(4):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.isfinite(p).all()
    assert torch.isfinite(opt.state[p]["m"]).all() and torch.isfinite(opt.state[p]["s"]).all()
    # zero gradient: d = 0 and lam = 1 (float32), so nothing moves
    assert torch.equal(p.detach(), before)
    assert all(math.isfinite(v) for v in opt.statistics()[0].values())


def test_constant_gradient_step_is_lr_times_gradient():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = GENIE([p], noise=False, mask=False, lr=0.1)
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    total = torch.zeros(3, dtype=torch.float64)
    for _ in range(5):
        p.grad = g.clone()
        opt.step()
        total -= 0.1 * g
    # no variance: lam = tanh(10), psi ~ 1
    torch.testing.assert_close(p.detach(), total * math.tanh(10.0), rtol=1e-6, atol=0)


def test_sparse_gradient_raises():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = GENIE(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="GENIE does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_nonfinite_gradient_skips_tensor_counts_and_warns_once(foreach):
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    opt = GENIE([a, b], foreach=foreach, seed=0, lr=0.1)
    a.grad, b.grad = torch.randn(3), torch.randn(2)
    opt.step()
    snap = {k: v.clone() for k, v in opt.state[a].items()}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        a.grad = torch.tensor([1.0, float("nan"), 2.0])
        b.grad = torch.randn(2)
        opt.step()
    assert torch.equal(a, a_before)
    for k in ("m", "s", "step"):
        assert torch.equal(opt.state[a][k], snap[k])
    assert not torch.equal(b, b_before)
    assert opt.state[a]["nonfinite_skips"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.grad = torch.tensor([float("inf"), 0.0, 0.0])
        opt.step()  # second skip: no second warning
    assert opt.state[a]["nonfinite_skips"] == 2
    assert opt.nonfinite_skips == 2
    assert opt.statistics()[0]["nonfinite_skips"] == 2
    assert torch.isfinite(opt.state[a]["m"]).all() and torch.isfinite(opt.state[a]["s"]).all()


def test_error_if_nonfinite_raises_before_any_update():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, 2, requires_grad=True)
    opt = GENIE([{"params": [a]}, {"params": [b]}], error_if_nonfinite=True)
    a.grad = torch.randn(3)
    b.grad = torch.tensor([[1.0, float("-inf")], [0.0, 0.0]])
    a_before = a.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(2, 2\)\)"):
        opt.step()
    assert torch.equal(a, a_before)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -0.1}, "lr"),
        ({"beta": 1.0}, "beta"),
        ({"beta": 1.2}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"p": 1.0}, "p"),
        ({"p": -0.01}, "p"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"eps": -1e-8}, "eps"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"variant": "adam"}, "variant"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    p = torch.zeros(2, requires_grad=True)
    key, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=rf"GENIE: invalid {name}=") as info:
        GENIE([p], **kwargs)
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    if name != "seed":
        opt = GENIE([p])
        with pytest.raises(ValueError, match=rf"invalid {name}="):
            opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], **kwargs})
        assert len(opt.param_groups) == 1


def test_error_message_states_range():
    with pytest.raises(ValueError, match=r"GENIE: invalid beta=1\.2; expected 0 <= beta < 1"):
        GENIE([torch.zeros(1, requires_grad=True)], beta=1.2)


def test_seed_none_uses_initial_seed():
    torch.manual_seed(1234)
    assert GENIE([torch.zeros(1, requires_grad=True)]).seed == 1234
