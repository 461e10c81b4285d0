"""GENIE(compiled=True): the fused inductor kernel against the eager paths.

Each distinct configuration compiles once (a few seconds on tiny tensors), so
the cases are few and share shapes.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from genie_dg.optim import GENIE
from genie_dg.optim.genie.compiled import compiled_mask, hash_bits, mask_threshold
from genie_dg.optim.genie.formulas import tanh_nonnegative

pytestmark = pytest.mark.e2e

SHAPES = [(8, 4), (16,), (3, 3, 2)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo allows recompile_limit graphs per function in a process; this module compiles more
    # configurations than that in all (inductor's on-disk cache keeps the recompiles cheap).
    torch._dynamo.reset()
    yield


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in SHAPES]


def _grads(step: int, dtype=torch.float32):
    # Alternating large and tiny gradients: var > 0.1 on some steps, so lam < 1
    # and the noise is active on some tensors and skipped on others.
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * (3.0 if step % 2 else 0.01)).to(dtype) for s in SHAPES]


def _train(params, opt, steps, start=0):
    for k in range(start, start + steps):
        for p, g in zip(params, _grads(k, params[0].dtype)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize(
    "switches",
    [
        dict(mask=False),  # reference, preconditioning and noise
        dict(mask=False, variant="algorithm1", noise_std=0.05),
        dict(mask=False, noise=False, weight_decay=0.1, maximize=True),
        dict(mask=False, preconditioning=False, weight_decay=0.1, decoupled_weight_decay=True),
    ],
)
def test_matches_foreach_up_to_rounding_without_mask(switches):
    eager, fused = _params(), _params()
    _train(eager, GENIE(eager, lr=0.1, seed=1, foreach=True, **switches), 5)
    opt = GENIE(fused, lr=0.1, seed=1, compiled=True, **switches)
    _train(fused, opt, 5)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(float(opt.state[p]["step"]) == 5 for p in fused)


def test_mask_is_the_documented_hash_of_generator_keys():
    """With noise off and no weight decay, m and s do not depend on theta, so each
    compiled step is the unmasked eager step times keep * 2^24 / (2^24 - thr)."""
    p_drop, lr = 0.4, 0.1
    eager, fused = _params(), _params()
    opt_e = GENIE(eager, lr=lr, seed=3, noise=False, mask=False, foreach=True)
    opt_c = GENIE(fused, lr=lr, seed=3, noise=False, p=p_drop, compiled=True)
    gen = torch.Generator().manual_seed(3)
    thr = mask_threshold(p_drop)
    scale = (1 << 24) / ((1 << 24) - thr)
    expected = [p.detach().clone() for p in fused]
    for k in range(3):
        before = [p.detach().clone() for p in eager]
        _train(eager, opt_e, 1, start=k)
        _train(fused, opt_c, 1, start=k)
        keys = torch.randint(-(1 << 63), (1 << 63) - 1, (len(SHAPES),), generator=gen, dtype=torch.int64)
        for j, (b, a) in enumerate(zip(before, eager)):
            keep = compiled_mask(b, keys[j], torch.tensor(thr))
            expected[j] = expected[j] + (a.detach() - b) * keep * scale
    for e, f in zip(expected, fused):
        torch.testing.assert_close(f.detach(), e, rtol=1e-5, atol=1e-6)
    assert torch.equal(opt_c._generators["cpu"].get_state(), gen.get_state())


def test_hash_mask_drops_a_fraction_p_independently_per_key():
    param = torch.empty(200_000)
    thr = torch.tensor(mask_threshold(0.3))
    a = compiled_mask(param, torch.tensor(12345), thr)
    b = compiled_mask(param, torch.tensor(12346), thr)
    assert abs(1 - a.float().mean().item() - 0.3) < 0.005
    # neighbouring keys, and neighbouring coordinates, are unrelated:
    # agreement ~ 0.7^2 + 0.3^2 = 0.58
    assert abs((a == b).float().mean().item() - 0.58) < 0.01
    assert abs((a[1:] == a[:-1]).float().mean().item() - 0.58) < 0.01
    high = compiled_mask(param, torch.tensor(12345 + (1 << 40)), thr)
    assert abs((a == high).float().mean().item() - 0.58) < 0.01


def _changed_bits(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = a ^ b
    return float(sum(((diff >> i) & 1).sum() for i in range(24))) / (24 * diff.numel())


def test_hash_is_uniform_and_every_index_and_key_bit_avalanches():
    """The int32 Feistel hash keeps the statistics of a good 32-bit mixer: uniform 24-bit
    outputs, and flipping any one input bit (index or key) flips about half the output bits."""
    index = torch.arange(1 << 18, dtype=torch.int32)
    key = torch.tensor(0x1234_5678_9ABC_DEF0)
    h = hash_bits(index, key)
    assert h.min() >= 0 and h.max() < (1 << 24)
    counts = torch.bincount(h >> 16, minlength=256).float()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 255 + 5 * (2 * 255) ** 0.5  # 5 sigma above the chi-square's mean
    for bit in (0, 1, 7, 15, 16, 17):
        assert abs(_changed_bits(h, hash_bits(index ^ (1 << bit), key)) - 0.5) < 0.02, bit
    for bit in (0, 15, 16, 31, 32, 47, 48, 62):
        assert abs(_changed_bits(h, hash_bits(index, key ^ (1 << bit))) - 0.5) < 0.02, bit
    assert torch.equal(hash_bits(index.long(), key), h.long())  # int64 indices (huge tensors) agree


def test_kernel_tanh_is_within_two_float32_ulps_of_torch_tanh():
    x = torch.cat([torch.zeros(1), torch.logspace(-30, 2, 200_001), torch.tensor([1e30, float("inf")])])
    got, want = tanh_nonnegative(x), torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * want.clamp(min=torch.finfo(torch.float32).tiny)
    assert ((got.double() - want).abs() <= 2 * ulp).all()
    assert torch.equal(tanh_nonnegative(torch.tensor([9.5, 10.0])), torch.ones(2))  # lam = 1: no noise
    x64 = x.double()
    assert torch.equal(tanh_nonnegative(x64), torch.tanh(x64))


def test_resume_from_state_dict_is_bit_identical():
    full = _params()
    opt = GENIE(full, lr=0.1, seed=4, compiled=True)
    _train(full, opt, 6)

    part = _params()
    opt1 = GENIE(part, lr=0.1, seed=4, compiled=True)
    _train(part, opt1, 3)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed = [p.detach().clone().requires_grad_(True) for p in part]
    opt2 = GENIE(resumed, lr=0.1, seed=999, compiled=True)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _train(resumed, opt2, 3, start=3)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_learning_rate_changes_do_not_recompile():
    from torch._dynamo.utils import counters

    params = _params()
    opt = GENIE(params, lr=0.1, seed=5, compiled=True)
    _train(params, opt, 2)
    before = counters["stats"]["unique_graphs"]
    for k in range(3):
        opt.param_groups[0]["lr"] = 0.05 / (k + 1)
        _train(params, opt, 1, start=2 + k)
    assert counters["stats"]["unique_graphs"] == before


def test_bfloat16_parameters_keep_float32_state():
    params = _params(torch.bfloat16)
    opt = GENIE(params, lr=0.1, seed=6, compiled=True, mask=False)
    ref = _params(torch.bfloat16)
    _train(ref, GENIE(ref, lr=0.1, seed=6, mask=False), 4)
    _train(params, opt, 4)
    for p, r in zip(params, ref):
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["m"].dtype == torch.float32
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_compiled_must_be_a_bool():
    with pytest.raises(ValueError, match="compiled"):
        GENIE(_params(), compiled="yes")


def test_trains_the_default_experiment_through_lightning(short_run_config):
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from genie_dg.pipeline import build

    steps = 5
    datamodule, model, trainer, _ = build(short_run_config("optimizer=genie", "optimizer.compiled=true", steps=steps))
    batch = next(iter(datamodule.train_dataloader()))
    datamodule.train_dataloader = lambda: DataLoader([batch] * steps, batch_size=None)

    def loss() -> float:
        # Batch statistics, as in training, on a copy so the running statistics stay put.
        network = copy.deepcopy(model.network).train()
        with torch.no_grad():
            x, y = torch.cat([b.x for b in batch]), torch.cat([b.y for b in batch])
            return F.cross_entropy(network(x), y).item()

    before = loss()
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == steps
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, GENIE) and optimizer.param_groups[0]["compiled"] is True
    assert loss() < before - 0.02


def test_a_missing_compiler_is_a_clear_error_that_changes_nothing():
    import torch._inductor.config as inductor_config

    from genie_dg.errors import UserInputError

    param = torch.randn(5, 7, requires_grad=True)  # a shape no other test compiles
    before = param.detach().clone()
    opt = GENIE([param], lr=0.1, compiled=True)
    param.grad = torch.ones(5, 7)
    no_compiler = {"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}
    with inductor_config.patch(no_compiler), pytest.raises(UserInputError, match=r"could not compile.*C\+\+ compiler"):
        opt.step()
    assert torch.equal(param.detach(), before)
    assert float(opt.state[param]["step"]) == 0 and not opt.state[param]["m"].any()
    # Retried eagerly, the step is the one an eager optimizer makes: the failure drew nothing.
    opt.param_groups[0]["compiled"] = False
    opt.step()
    eager = before.clone().requires_grad_()
    eager.grad = torch.ones(5, 7)
    GENIE([eager], lr=0.1).step()
    assert torch.equal(param.detach(), eager.detach())


def test_mixed_dtypes_eps_zero_and_empty_tensors_match_the_eager_step():
    """One group of float64, float32 and empty tensors with eps = 0 and zero gradients: each
    dtype gets its own kernel (so its own floor), and nothing turns into NaN."""

    def make():
        return [
            torch.ones(4, dtype=torch.float64, requires_grad=True),
            torch.ones(3, requires_grad=True),
            torch.ones(0, requires_grad=True),
        ]

    eager, fused = make(), make()
    opt_e = GENIE(eager, lr=0.1, eps=0.0, mask=False, seed=2, foreach=False)
    opt_c = GENIE(fused, lr=0.1, eps=0.0, mask=False, seed=2, compiled=True)
    for k in range(3):
        for group in (eager, fused):
            for q in group:
                q.grad = torch.zeros_like(q) if k < 2 else torch.full_like(q, 0.5)
        opt_e.step()
        opt_c.step()
    for a, b in zip(eager, fused):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_p_next_to_one_still_steps():
    param = torch.ones(6, requires_grad=True)
    opt = GENIE([param], lr=0.1, p=1 - 2.0**-26, compiled=True, noise=False)
    param.grad = torch.ones(6)
    opt.step()
    assert torch.isfinite(param).all()


def test_loading_a_checkpoint_keeps_this_optimizers_implementation():
    params = _params()
    compiled = GENIE(params, lr=0.1, seed=7, compiled=True)
    _train(params, compiled, 1)
    eager = GENIE(params, lr=0.1, seed=7, foreach=False)
    eager.load_state_dict(compiled.state_dict())
    assert eager.param_groups[0]["compiled"] is False and eager.param_groups[0]["foreach"] is False
    back = GENIE(params, lr=0.1, seed=7, compiled=True)
    back.load_state_dict(eager.state_dict())
    assert back.param_groups[0]["compiled"] is True


@pytest.mark.cuda
def test_cuda_hash_mask_is_the_cpu_one():
    param = torch.empty(1000, 33)
    thr = torch.tensor(mask_threshold(0.4))
    for key in (0, 12345, -(1 << 62), (1 << 63) - 1):
        key_t = torch.tensor(key)
        cpu = compiled_mask(param, key_t, thr)
        cuda = compiled_mask(param.cuda(), key_t.cuda(), thr.cuda())
        assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("switches", [dict(mask=False), dict(mask=False, variant="algorithm1", noise_std=0.05)])
def test_cuda_compiled_matches_cuda_eager_without_mask(switches):
    eager = [p.detach().cuda().requires_grad_(True) for p in _params()]
    fused = [p.detach().cuda().requires_grad_(True) for p in _params()]
    for params, opt in (
        (eager, GENIE(eager, lr=0.1, seed=1, foreach=True, **switches)),
        (fused, GENIE(fused, lr=0.1, seed=1, compiled=True, **switches)),
    ):
        for k in range(5):
            for p, g in zip(params, _grads(k)):
                p.grad = g.cuda()
            opt.step()
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_compiled_mask_drops_exactly_the_hashed_coordinates():
    """Inductor emits Triton on CUDA; its mask must be the documented hash of the drawn key."""
    param = torch.zeros(64, 65, device="cuda", requires_grad=True)
    opt = GENIE([param], lr=0.1, seed=3, p=0.4, noise=False, compiled=True)
    gen = torch.Generator(device="cuda").manual_seed(3)
    key = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=gen, dtype=torch.int64, device="cuda")[0]
    param.grad = torch.ones_like(param)
    opt.step()
    moved = param.detach() != 0
    assert torch.equal(moved, compiled_mask(param, key, torch.tensor(mask_threshold(0.4), device="cuda")))
