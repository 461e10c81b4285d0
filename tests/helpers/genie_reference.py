"""An independent, line-by-line float64 reading of GENIE's update rule (docs/genie.md) in plain
Python floats, and the small drivers the GENIE tests share."""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------
# an independent, line-by-line float64 reading of docs/genie.md (plain Python floats)
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

    def __init__(
        self,
        values,
        *,
        lr=0.015,
        beta=0.95,
        p=0.4,
        eps=1e-8,
        variant="reference",
        preconditioning=True,
        noise=True,
        mask=True,
        noise_std=1e-3,
        weight_decay=0.0,
        decoupled=False,
        seed=0,
    ):
        self.theta = [list(v) for v in values]
        self.m = [[0.0] * len(v) for v in values]
        self.s = [[0.0] * len(v) for v in values]
        self.t = 0
        self.hp = dict(
            lr=lr,
            beta=beta,
            p=p,
            eps=eps,
            variant=variant,
            preconditioning=preconditioning,
            noise=noise,
            mask=mask,
            noise_std=noise_std,
            wd=weight_decay,
            decoupled=decoupled,
        )
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


def grads_sequence(shapes, steps, seed, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(sh, generator=gen, dtype=dtype) * scale for sh in shapes] for _ in range(steps)]


def run_steps(params, opt, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


def pair(**kw):
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [x.detach().clone().requires_grad_(True) for x in a]
    return a, b
