"""Tests of the GENIE optimizer against its update rule (docs/genie.md)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from genie_dg.optim import GENIE, register_timm

# ---------------------------------------------------------------------------
# an independent, line-by-line float64 reading of genie.md (plain Python floats)
# ---------------------------------------------------------------------------


def ref_direction(m, s, t, beta, eps, variant, preconditioning):
    """Return (d, lam, scale) lists for one tensor; m, s already updated."""
    if variant == "reference":
        c = 1 - beta**t
        rho = (1 - beta) * (1 + beta**t) / ((1 + beta) * (1 - beta**t))
        d, lam, absmpsi = [], [], []
        for mj, sj in zip(m, s):
            m_hat = mj / c
            s_hat = sj / c
            if t == 1 or rho == 1:
                var = eps  # the t = 1 guard; (x/0 is not finite when beta = 0, rho = 1)
            else:
                var = (s_hat - m_hat**2) / (1 - rho)
                if var <= 0 or not math.isfinite(var):
                    var = eps
            la = math.tanh(min(1 / var, 10))
            var_mean = rho * var
            if var_mean <= 0:
                var_mean = eps
            psi = (m_hat**2 + eps) / (m_hat**2 + eps + var_mean)
            d.append(m_hat * psi * la if preconditioning else m_hat)
            lam.append(la)
            absmpsi.append(la * abs(m_hat) * psi)
        scale = sum(absmpsi) / max(sum(lam), torch.finfo(torch.float64).tiny)
        return d, lam, scale
    # algorithm1
    d, lam = [], []
    for mj, vj in zip(m, s):
        var = max(vj - mj**2, eps)
        la = math.tanh(1 / var)
        base = mj / (1 - beta**t)
        d.append(base * la * mj**2 / (vj + eps) if preconditioning else base)
        lam.append(la)
    return d, lam, None


class RefGENIE:
    """Reference optimizer on lists of Python floats (float64)."""

    def __init__(self, values, *, lr=0.015, beta=0.95, p=0.4, eps=1e-8, variant="reference",
                 preconditioning=True, noise=True, mask=True, noise_std=1e-3, weight_decay=0.0,
                 decoupled=False, seed=0):
        self.theta = [list(v) for v in values]
        self.m = [[0.0] * len(v) for v in values]
        self.s = [[0.0] * len(v) for v in values]
        self.t = 0
        self.hp = dict(lr=lr, beta=beta, p=p, eps=eps, variant=variant, preconditioning=preconditioning,
                       noise=noise, mask=mask, noise_std=noise_std, wd=weight_decay, decoupled=decoupled)
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, grads):
        h = self.hp
        self.t += 1
        for i, g in enumerate(grads):
            th, m, s = self.theta[i], self.m[i], self.s[i]
            if h["wd"] and not h["decoupled"]:
                g = [gj + h["wd"] * tj for gj, tj in zip(g, th)]
            if h["wd"] and h["decoupled"]:
                th[:] = [tj * (1 - h["lr"] * h["wd"]) for tj in th]
            m[:] = [h["beta"] * mj + (1 - h["beta"]) * gj for mj, gj in zip(m, g)]
            s[:] = [h["beta"] * sj + (1 - h["beta"]) * gj**2 for sj, gj in zip(s, g)]
            d, lam, scale = ref_direction(m, s, self.t, h["beta"], h["eps"], h["variant"], h["preconditioning"])
            n = len(th)
            noise = [0.0] * n
            if h["noise"] and any(1 - la != 0 for la in lam):
                xi = torch.randn(n, generator=self.gen, dtype=torch.float64).tolist()
                amp = scale if h["variant"] == "reference" else h["noise_std"]
                noise = [(1 - la) * amp * x for la, x in zip(lam, xi)]
            mask = [1.0] * n
            if h["mask"] and h["p"] > 0:
                u = torch.rand(n, generator=self.gen, dtype=torch.float64).tolist()
                mask = [(1.0 if uj > h["p"] else 0.0) / (1 - h["p"]) for uj in u]
            th[:] = [tj - h["lr"] * (dj + nj) * mk for tj, dj, nj, mk in zip(th, d, noise, mask)]


def _grads_sequence(shapes, steps, seed, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(sh, generator=gen, dtype=dtype) * scale for sh in shapes] for _ in range(steps)]


def _run(params, opt, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


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
    hp = dict(lr=0.1, beta=beta, p=0.3, eps=eps, variant=variant, preconditioning=pre, noise=noise,
              mask=mask, noise_std=0.05)
    ref = RefGENIE(init, seed=7, **hp)
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in init]
    opt = GENIE(params, seed=7, foreach=foreach, **hp)
    for t, g in enumerate(grads, start=1):
        ref.step(g)
        for p, gg in zip(params, g):
            p.grad = torch.tensor(gg, dtype=torch.float64)
        opt.step()
        for p, want, m, s in zip(params, ref.theta, ref.m, ref.s):
            torch.testing.assert_close(p.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14,
                                       msg=f"theta at t={t}")
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
def _pair(**kw):
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [x.detach().clone().requires_grad_(True) for x in a]
    return a, b


@pytest.mark.parametrize("variant", ["reference", "algorithm1"])
def test_p_zero_equals_mask_off(variant):
    a, b = _pair()
    oa = GENIE(a, p=0.0, mask=True, seed=1, variant=variant, lr=0.1)
    ob = GENIE(b, p=0.4, mask=False, seed=1, variant=variant, lr=0.1)
    seq = _grads_sequence([(3, 4), (5,)], 5, seed=2, scale=3.0, dtype=torch.float32)
    _run(a, oa, seq)
    _run(b, ob, seq)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(oa._generators["cpu"].get_state(), ob._generators["cpu"].get_state())


def test_no_draws_when_noise_and_mask_off():
    a, _ = _pair()
    opt = GENIE(a, noise=False, mask=False, seed=5)
    _run(a, opt, _grads_sequence([(3, 4), (5,)], 3, seed=2, scale=3.0, dtype=torch.float32))
    assert opt._generators == {}


def test_mask_only_draws_uniform_per_param():
    a, _ = _pair()
    opt = GENIE(a, noise=False, mask=True, seed=5)
    _run(a, opt, _grads_sequence([(3, 4), (5,)], 2, seed=2, dtype=torch.float32))
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
    for t, grads in enumerate(_grads_sequence([(7,)], 4, seed=1, dtype=dtype), start=1):
        g = grads[0]
        p.grad = g.clone()
        opt.step()
        m = beta * m + (1 - beta) * g
        theta = theta - lr * m / (1 - beta**t)
        torch.testing.assert_close(p.detach(), theta)


def test_preconditioning_changes_the_step():
    a, b = _pair()
    oa = GENIE(a, noise=False, mask=False, preconditioning=True, lr=0.1)
    ob = GENIE(b, noise=False, mask=False, preconditioning=False, lr=0.1)
    seq = _grads_sequence([(3, 4), (5,)], 3, seed=4, scale=2.0, dtype=torch.float32)
    _run(a, oa, seq)
    _run(b, ob, seq)
    assert not torch.allclose(a[0], b[0])


def test_noise_changes_the_step_and_is_scaled_by_one_minus_lam():
    a, b = _pair()
    oa = GENIE(a, noise=True, mask=False, lr=0.1, seed=0)
    ob = GENIE(b, noise=False, mask=False, lr=0.1, seed=0)
    seq = _grads_sequence([(3, 4), (5,)], 4, seed=4, scale=3.0, dtype=torch.float32)
    _run(a, oa, seq)
    _run(b, ob, seq)
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_forms(decoupled):
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    theta = p.detach().clone()
    lr, wd, beta = 0.1, 0.3, 0.9
    opt = GENIE([p], lr=lr, beta=beta, weight_decay=wd, decoupled_weight_decay=decoupled,
                preconditioning=False, noise=False, mask=False)
    m = torch.zeros_like(theta)
    for t, grads in enumerate(_grads_sequence([(5,)], 3, seed=1), start=1):
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
    a, b = _pair()
    oa = GENIE(a, weight_decay=0.5, decoupled_weight_decay=False, lr=0.1, seed=0)
    ob = GENIE(b, weight_decay=0.5, decoupled_weight_decay=True, lr=0.1, seed=0)
    seq = _grads_sequence([(3, 4), (5,)], 2, seed=4, dtype=torch.float32)
    _run(a, oa, seq)
    _run(b, ob, seq)
    assert not torch.allclose(a[0], b[0])


@pytest.mark.parametrize("foreach", [False, True])
def test_maximize_equals_negated_gradient(foreach):
    a, b = _pair()
    oa = GENIE(a, maximize=True, seed=3, foreach=foreach, lr=0.1)
    ob = GENIE(b, maximize=False, seed=3, foreach=foreach, lr=0.1)
    seq = _grads_sequence([(3, 4), (5,)], 4, seed=4, scale=3.0, dtype=torch.float32)
    grads_before = [[g.clone() for g in gs] for gs in seq]
    _run(a, oa, seq)
    _run(b, ob, [[-g for g in gs] for gs in seq])
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


# ---------------------------------------------------------------------------
# implementations, state, reproducibility
# ---------------------------------------------------------------------------
def _make_groups(dtype_mix=True):
    torch.manual_seed(0)
    shapes = [(4, 3), (7,), (2, 3, 2), (1,), (5, 5)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.bfloat16] if dtype_mix else [torch.float32] * 5
    params = [(torch.randn(sh) * 2).to(dt).requires_grad_(True) for sh, dt in zip(shapes, dtypes)]
    groups = [
        {"params": params[:2]},
        {"params": params[2:4], "lr": 0.05, "beta": 0.8, "p": 0.2, "weight_decay": 0.01, "variant": "algorithm1",
         "noise_std": 0.1},
        {"params": params[4:], "lr": 0.2, "decoupled_weight_decay": True, "weight_decay": 0.1, "maximize": True,
         "preconditioning": False},
    ]
    return params, groups, shapes


def _clone_groups(groups):
    out = []
    for g in groups:
        g2 = dict(g)
        g2["params"] = [p.detach().clone().requires_grad_(True) for p in g["params"]]
        out.append(g2)
    return out


def _flat(groups):
    return [p for g in groups for p in g["params"]]


def _assert_same_state(o1, p1, o2, p2):
    for x, y in zip(p1, p2):
        assert torch.equal(x, y)
        s1, s2 = o1.state[x], o2.state[y]
        assert set(s1) == set(s2)
        for k in s1:
            if isinstance(s1[k], torch.Tensor):
                assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k
            else:
                assert s1[k] == s2[k]
    g1, g2 = o1._generator_states(), o2._generator_states()
    assert g1.keys() == g2.keys()
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_foreach_and_single_tensor_are_bitwise_identical():
    _, groups, shapes = _make_groups()
    ga, gb = _clone_groups(groups), _clone_groups(groups)
    oa = GENIE(ga, foreach=True, seed=11)
    ob = GENIE(gb, foreach=False, seed=11)
    pa, pb = _flat(ga), _flat(gb)
    gen = torch.Generator().manual_seed(0)
    for k in range(6):
        for x, y, sh in zip(pa, pb, shapes):
            # vary the scale so that noise is active on some tensors only
            g = torch.randn(sh, generator=gen) * (3.0 if k % 2 else 0.01)
            x.grad = g.to(x.dtype)
            y.grad = g.to(y.dtype)
        if k == 3:  # one tensor without a gradient in one step
            pa[1].grad = None
            pb[1].grad = None
        oa.step()
        ob.step()
        _assert_same_state(oa, pa, ob, pb)
    assert "cpu" in oa._generators


def _train_with_checkpoint(params_groups, total, split, seed_grads, kw):
    """Run `total` steps uninterrupted and with a save/load after `split`."""
    ga, gb = _clone_groups(params_groups), _clone_groups(params_groups)
    pa = _flat(ga)
    shapes = [p.shape for p in pa]
    seq = _grads_sequence(shapes, total, seed=seed_grads, scale=2.0, dtype=torch.float32)
    oa = GENIE(ga, seed=5, **kw)
    _run(pa, oa, seq)

    pb = _flat(gb)
    ob = GENIE(gb, seed=5, **kw)
    _run(pb, ob, seq[:split])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in pb], "optim": ob.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    gc = _clone_groups(params_groups)
    pc = _flat(gc)
    with torch.no_grad():
        for p, v in zip(pc, ckpt["params"]):
            p.copy_(v)
    oc = GENIE(gc, seed=999, **kw)  # the checkpoint's generator state must win
    oc.load_state_dict(ckpt["optim"])
    _run(pc, oc, seq[split:])
    return oa, pa, oc, pc


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip_continues_bit_identically(foreach):
    _, groups, _ = _make_groups()
    oa, pa, oc, pc = _train_with_checkpoint(groups, total=6, split=3, seed_grads=1,
                                            kw={"foreach": foreach, "noise": True, "mask": True})
    _assert_same_state(oa, pa, oc, pc)
    bf16 = [p for p in pc if p.dtype == torch.bfloat16][0]
    assert oc.state[bf16]["m"].dtype == torch.float32


def test_state_dict_contents():
    p = torch.randn(3, requires_grad=True)
    opt = GENIE([p], seed=3)
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "m", "s"}
    assert sd["state"][0]["step"].shape == () and sd["state"][0]["step"].dtype == torch.float32
    assert sd["generator_states"]["cpu"].dtype == torch.uint8
    assert sd["genie_seed"] == 3
    # deepcopy (used by Lightning/SWA utilities) works and keeps the stream
    clone = copy.deepcopy(opt)
    assert torch.equal(clone.state_dict()["generator_states"]["cpu"], sd["generator_states"]["cpu"])


def test_same_seed_replicas_stay_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    replica = copy.deepcopy(model)
    other = copy.deepcopy(model)
    oa = GENIE(model.parameters(), seed=42, lr=0.1)
    ob = GENIE(replica.parameters(), seed=42, lr=0.1)
    oc = GENIE(other.parameters(), seed=43, lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(5):
        for mdl, opt in ((model, oa), (replica, ob), (other, oc)):
            opt.zero_grad()
            nn.functional.cross_entropy(mdl(x), y).backward()
            opt.step()
    for pa, pb in zip(model.parameters(), replica.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(model.parameters(), other.parameters()))


def test_float64_state_stays_float64():
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = GENIE([p])
    p.grad = torch.randn(3, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["m"].dtype == torch.float64 and opt.state[p]["s"].dtype == torch.float64
    assert p.dtype == torch.float64


@pytest.mark.parametrize("foreach", [False, True])
def test_bfloat16_computes_in_float32(foreach):
    torch.manual_seed(0)
    p16 = torch.randn(6).to(torch.bfloat16).requires_grad_(True)
    p32 = p16.detach().float().requires_grad_(True)
    o16 = GENIE([p16], seed=1, lr=0.1, foreach=foreach)
    o32 = GENIE([p32], seed=1, lr=0.1, foreach=foreach)
    g = (torch.randn(6) * 3).to(torch.bfloat16)
    p16.grad, p32.grad = g, g.float()
    o16.step()
    o32.step()
    assert p16.dtype == torch.bfloat16
    assert o16.state[p16]["m"].dtype == torch.float32 and o16.state[p16]["s"].dtype == torch.float32
    assert torch.equal(o16.state[p16]["m"], o32.state[p32]["m"])
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


# ---------------------------------------------------------------------------
# integration
# ---------------------------------------------------------------------------
def test_timm_factory_creates_genie():
    import logging

    from timm.optim import create_optimizer_v2

    assert register_timm() is True  # explicit: importing genie_dg registers nothing
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = create_optimizer_v2(model, "genie", lr=0.05, weight_decay=1e-4)
    assert isinstance(opt, GENIE)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]
    assert all(g["lr"] == 0.05 for g in opt.param_groups)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    logging.getLogger("timm").setLevel(logging.WARNING)
    assert register_timm() is True  # idempotent


def test_statistics_are_sane_and_free():
    a, b = _pair()
    oa = GENIE(a, seed=2, lr=0.1)
    ob = GENIE(b, seed=2, lr=0.1)
    assert oa.statistics()[0]["numel"] == 0
    seq = _grads_sequence([(3, 4), (5,)], 4, seed=4, scale=3.0, dtype=torch.float32)
    for grads in seq:
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        stats = oa.statistics()
    _assert_same_state(oa, a, ob, b)
    (st,) = stats
    assert all(math.isfinite(v) for v in st.values())
    for key in ("noise_active_fraction", "mask_fraction", "precond_mean", "lam_mean"):
        assert 0.0 <= st[key] <= 1.0, key
    assert st["gsnr_mean"] >= 0
    assert st["mask_fraction"] == pytest.approx(0.4)
    assert st["noise_active_fraction"] > 0  # large noisy gradients
    assert st["numel"] == 17 and st["step"] == 4


def _blobs(seed, n=256, dim=8, classes=4):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 2.0
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return x, y


def _train(make_opt, seed, steps=150):
    x, y = _blobs(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = make_opt(model.parameters(), seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        last = nn.functional.cross_entropy(model(x), y).item()
    return first, last


def test_genie_reduces_training_loss_like_sgd():
    genie, sgd = [], []
    for seed in range(3):
        f, l_g = _train(lambda ps, s: GENIE(ps, lr=0.1, seed=s), seed)
        _, l_s = _train(lambda ps, s: torch.optim.SGD(ps, lr=0.1), seed)
        genie.append(l_g / f)
        sgd.append(l_s / f)
    assert all(r < 0.3 for r in genie), genie
    # at least as reliable as SGD at its usual step size
    assert sum(r < 0.3 for r in genie) >= sum(r < 0.3 for r in sgd)
    assert max(genie) <= max(sgd) * 1.5, (genie, sgd)


@pytest.mark.parametrize("foreach", [False, True])
def test_overflowing_second_moment_is_guarded(foreach):
    # g^2 overflows float32, so s = inf and var is not finite: the guard sets
    # var = eps (lam = 1, psi ~ 1) instead of letting lam = tanh(1/inf) = 0.
    p = torch.zeros(2, requires_grad=True)
    opt = GENIE([p], lr=1e-19, beta=0.5, noise=False, mask=False, foreach=foreach)
    for g0 in (1e19, -3e19):  # m_hat^2 stays finite, g^2 does not at step 2
        p.grad = torch.tensor([g0, 1.0])
        before = p.detach().clone()
        opt.step()
    assert torch.isinf(opt.state[p]["s"][0])
    m_hat = (0.5 * 0.5 * 1e19 + 0.5 * -3e19) / 0.75
    torch.testing.assert_close(before[0] - p.detach()[0], torch.tensor(1e-19 * m_hat), rtol=1e-5, atol=0)


def test_float16_autocast_with_grad_scaler_skips_overflowing_steps():
    """What trainer.precision=16-mixed does (Lightning falls back to bf16 on the CPU, so the
    contract is checked directly): GradScaler unscales before step() and skips steps whose
    gradients overflowed, leaving GENIE's state and generator untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = GENIE(model.parameters(), lr=0.05, seed=0)
    # 2^40 overflows float16 in the backward pass: the first steps must be skipped.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    losses, skipped = [], 0
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        before = {id(p): float(st["step"]) for p, st in opt.state.items()}
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped += 1
            assert {id(p): float(st["step"]) for p, st in opt.state.items()} == before
        losses.append(loss.item())
    assert skipped >= 1
    assert all(st["m"].dtype == torch.float32 and torch.isfinite(st["s"]).all() for st in opt.state.values())
    assert float(next(iter(opt.state.values()))["step"]) == 40 - skipped
    assert losses[-1] < losses[skipped] - 0.02


@pytest.mark.parametrize("foreach", [False, True])
def test_an_empty_parameter_is_stepped_without_error(foreach):
    params = [torch.ones(0, requires_grad=True), torch.ones(3, requires_grad=True)]
    opt = GENIE(params, lr=0.1, foreach=foreach, seed=0)
    for _ in range(3):
        params[0].grad, params[1].grad = torch.ones(0), torch.full((3,), 2.0)
        opt.step()
    assert float(opt.state[params[0]]["step"]) == 3 and torch.isfinite(params[1]).all()
