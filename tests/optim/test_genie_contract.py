"""GENIE against the generic checks PyTorch applies to its own optimizers.

Modelled on the structure of ``torch.testing._internal.common_optimizers`` (an
``OptimizerInfo`` describing the optimizer, a function of optimizer inputs, a function of error
inputs) and the checks of torch's ``test/test_optim.py`` that use them: errors, state-dict round
trip with and without parameter names, deepcopy, pickle, parameter groups added later, zero-size
and mixed-dtype parameters, closures, ``maximize``, tensor ``lr``, foreach against the for-loop,
complex parameters. Draws are seeded, so two implementations are compared bit for bit. Only
public torch API is imported (``torch.testing._internal`` is not a stable interface).
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from genie_dg.optim import GENIE
from genie_dg.optim.genie import default_foreach


@dataclass
class OptimizerInput:
    """Constructor arguments besides the parameters (``params`` only for error inputs)."""

    kwargs: dict[str, Any]
    desc: str
    params: Any = None


@dataclass
class ErrorOptimizerInput:
    optimizer_input: OptimizerInput
    error_type: type[BaseException]
    error_regex: str


@dataclass
class OptimizerInfo:
    optim_cls: type[torch.optim.Optimizer]
    optim_inputs_func: Callable[[], list[OptimizerInput]]
    optim_error_inputs_func: Callable[[], list[ErrorOptimizerInput]]
    supported_impls: tuple[str, ...] = ("foreach",)
    supports_complex: bool = True
    step_requires_closure: bool = False
    # Keys every parameter group carries (torch's optional "param_names" aside).
    group_keys: frozenset[str] = field(default_factory=frozenset)


def genie_optim_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 0.1, "p": 0.0}, "no mask"),
        OptimizerInput({"lr": 0.1, "weight_decay": 0.1}, "L2 weight decay"),
        OptimizerInput({"lr": 0.1, "weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled weight decay"),
        OptimizerInput({"lr": 0.1, "maximize": True}, "maximize"),
        OptimizerInput({"lr": torch.tensor(0.1)}, "Tensor lr"),
        OptimizerInput({"lr": 0.1, "variant": "algorithm1", "noise_std": 0.05}, "algorithm1"),
        OptimizerInput({"lr": 0.1, "preconditioning": False}, "no preconditioning"),
        OptimizerInput({"lr": 0.1, "noise": False, "mask": False}, "preconditioning only"),
        OptimizerInput({"lr": 0.1, "eps": 0.0}, "eps = 0"),
    ]


def genie_error_inputs() -> list[ErrorOptimizerInput]:
    sample, sample2 = nn.Parameter(torch.randn(1, 1)), nn.Parameter(torch.randn(1, 1))
    # The first five are torch's error inputs for every optimizer (get_error_inputs_for_all_optims).
    generic = [
        (OptimizerInput({}, "invalid param type", sample), TypeError,
         "params argument given to the optimizer should be an iterable of Tensors or dicts"),
        (OptimizerInput({}, "duplicate parameters in a group", [sample, sample]), UserWarning,
         ".*a parameter group with duplicate parameters.*"),
        (OptimizerInput({}, "duplicate parameters across groups", [{"params": sample}, {"params": sample}]),
         ValueError, "some parameters appear in more than one parameter group"),
        (OptimizerInput({"lr": torch.tensor([0.001, 0.001])}, "Tensor lr must be 1-element"), ValueError,
         "Tensor lr must be 1-element"),
        (OptimizerInput({}, "names missing", [("weight", sample), sample2]), ValueError,
         "all optimizer params should be with/without names. Some param names are missing"),
    ]  # fmt: skip
    own = [
        (OptimizerInput({"lr": -0.01}, "negative lr"), ValueError, r"GENIE: invalid lr=-0\.01; expected lr >= 0"),
        (OptimizerInput({"beta": 1.0}, "beta = 1"), ValueError, r"expected 0 <= beta < 1"),
        (OptimizerInput({"p": 1.0}, "p = 1"), ValueError, r"expected 0 <= p < 1"),
        (OptimizerInput({"eps": -1e-8}, "negative eps"), ValueError, r"expected eps >= 0"),
        (OptimizerInput({"weight_decay": -1.0}, "negative wd"), ValueError, r"expected weight_decay >= 0"),
        (OptimizerInput({"variant": "adam"}, "unknown variant"), ValueError, r"invalid variant='adam'"),
        (OptimizerInput({"foreach": "yes"}, "foreach not a bool"), ValueError, r"invalid foreach='yes'"),
    ]
    return [ErrorOptimizerInput(i, t, r) for i, t, r in generic + own]


GENIE_INFO = OptimizerInfo(
    GENIE,
    optim_inputs_func=genie_optim_inputs,
    optim_error_inputs_func=genie_error_inputs,
    group_keys=frozenset(
        "params lr beta p weight_decay decoupled_weight_decay eps variant preconditioning noise mask "
        "noise_std maximize foreach error_if_nonfinite compiled".split()
    ),
)
INPUTS = GENIE_INFO.optim_inputs_func()
IDS = [i.desc for i in INPUTS]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def _batches(n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def _make(model: nn.Module, kwargs: dict, *, named: bool = False, **extra) -> GENIE:
    params = model.named_parameters() if named else model.parameters()
    return GENIE_INFO.optim_cls(params, seed=5, **{**kwargs, **extra})


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"] or _groups_equal(a["param_groups"], b["param_groups"])
    assert a["state"].keys() == b["state"].keys()
    for index, st in a["state"].items():
        assert st.keys() == b["state"][index].keys()
        for key, value in st.items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)
    assert a["generator_states"].keys() == b["generator_states"].keys()
    assert all(torch.equal(v, b["generator_states"][k]) for k, v in a["generator_states"].items())
    assert a["genie_seed"] == b["genie_seed"]


def _groups_equal(a: list[dict], b: list[dict]) -> bool:
    # Groups holding a tensor lr cannot be compared with ==.
    for ga, gb in zip(a, b, strict=True):
        assert ga.keys() == gb.keys()
        for key in ga:
            same = torch.equal(ga[key], gb[key]) if torch.is_tensor(ga[key]) else ga[key] == gb[key]
            assert same, key
    return True


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("error_input", GENIE_INFO.optim_error_inputs_func(), ids=lambda e: e.optimizer_input.desc)
def test_errors(error_input):
    inp = error_input.optimizer_input
    params = inp.params if inp.params is not None else [nn.Parameter(torch.randn(2, 2))]
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            GENIE_INFO.optim_cls(params, **inp.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            GENIE_INFO.optim_cls(params, **inp.kwargs)


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_goes_right_direction(optim_input):
    model = _model()
    opt = _make(model, optim_input.kwargs)
    batches = _batches(1) * 30
    losses = _train(model, opt, batches)
    if optim_input.kwargs.get("maximize"):
        assert losses[-1] > losses[0]
    else:
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("named", [False, True], ids=["without names", "with names"])
@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_state_dict_round_trip(optim_input, named):
    """Save, load into a fresh optimizer, save again: identical; and training continues bit for
    bit as an uninterrupted run (torch's test_state_dict_deterministic and
    test_save_load_equality_with_weights_only)."""
    straight, resumed = _model(), _model()
    batches = _batches(6)
    _train(straight, _make(straight, optim_input.kwargs, named=named), batches)
    first = _make(resumed, optim_input.kwargs, named=named)
    _train(resumed, first, batches[:3])
    saved = first.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    second = _make(resumed, optim_input.kwargs, named=named)
    second.load_state_dict(loaded)
    _assert_state_dicts_equal(second.state_dict(), saved)
    assert ("param_names" in second.state_dict()["param_groups"][0]) is named
    for group in second.state_dict()["param_groups"]:
        assert set(group) - {"param_names"} == GENIE_INFO.group_keys
    _train(resumed, second, batches[3:])
    _assert_same_params(straight, resumed)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_everything_and_add_nothing(how):
    model = _model()
    opt = _make(model, {"lr": 0.1})
    _train(model, opt, _batches(2))
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert "differentiable" not in clone.defaults
    for group in clone.param_groups:
        assert set(group) == GENIE_INFO.group_keys
    _assert_state_dicts_equal(clone.state_dict(), opt.state_dict())
    clone.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert set(clone.param_groups[-1]) == GENIE_INFO.group_keys


def test_a_plain_number_step_in_a_loaded_state_dict_works():
    """Older or converted checkpoints store ``step`` as a number (torch's test_load_nontensor_step)."""
    straight, resumed = _model(), _model()
    batches = _batches(4)
    _train(straight, _make(straight, {}), batches)
    first = _make(resumed, {})
    _train(resumed, first, batches[:2])
    saved = first.state_dict()
    for st in saved["state"].values():
        st["step"] = float(st["step"])
    second = _make(resumed, {})
    second.load_state_dict(saved)
    assert all(torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32 for st in second.state.values())
    _train(resumed, second, batches[2:])
    _assert_same_params(straight, resumed)


def test_param_groups_added_later_step_and_round_trip():
    model = _model()
    extra = nn.Parameter(torch.randn(3, 3))
    opt = _make(model, {"lr": 0.1})
    _train(model, opt, _batches(2))
    opt.add_param_group({"params": [extra], "lr": 0.05, "variant": "algorithm1"})
    extra.grad = torch.ones(3, 3)
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(extra, before)
    assert set(opt.param_groups[-1]) == GENIE_INFO.group_keys
    fresh = GENIE([{"params": list(model.parameters())}, {"params": [extra]}], seed=5)
    fresh.load_state_dict(opt.state_dict())
    _assert_state_dicts_equal(fresh.state_dict(), opt.state_dict())


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_size_and_mixed_dtype_params(foreach):
    params = [
        nn.Parameter(torch.randn(0, 3)),
        nn.Parameter(torch.randn(4, dtype=torch.float64)),
        nn.Parameter(torch.randn(3, 2)),
        nn.Parameter(torch.randn(5).to(torch.bfloat16)),
    ]
    opt = GENIE(params, lr=0.1, foreach=foreach, seed=0)
    for _ in range(3):
        for q in params:
            q.grad = torch.randn(q.shape).to(q.dtype) * 3
        opt.step()
    assert [opt.state[q]["m"].dtype for q in params] == [torch.float32, torch.float64, torch.float32, torch.float32]
    assert all(torch.isfinite(q).all() for q in params)


def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned():
    model = _model()
    opt = _make(model, {})
    calls = []
    x, y = _batches(1)[0]

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and torch.is_tensor(loss)


def test_step_is_a_noop_when_no_param_has_a_gradient():
    model = _model()
    opt = _make(model, {})
    before = [q.detach().clone() for q in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state and opt._generators == {}


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
def test_tensor_lr_steps_as_the_float_lr(shape):
    a, b = _model(), _model()
    batches = _batches(3)
    _train(a, _make(a, {"lr": 0.1}), batches)
    _train(b, _make(b, {"lr": torch.full(shape, 0.1)}), batches)
    _assert_same_params(a, b)


def test_tensor_lr_refusal_is_worded_as_torchs():
    with pytest.raises(ValueError) as ours:
        GENIE([nn.Parameter(torch.zeros(2))], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError) as torchs:
        torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=torch.tensor([0.1, 0.2]))
    assert str(torchs.value) in str(ours.value)


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_foreach_matches_forloop(optim_input):
    a, b = _model(), _model()
    batches = _batches(4)
    oa, ob = _make(a, optim_input.kwargs, foreach=True), _make(b, optim_input.kwargs, foreach=False)
    _train(a, oa, batches)
    _train(b, ob, batches)
    _assert_same_params(a, b)
    _assert_state_dicts_equal(oa.state_dict() | {"param_groups": []}, ob.state_dict() | {"param_groups": []})


def test_foreach_none_picks_the_per_tensor_path_on_the_cpu_and_foreach_elsewhere():
    assert default_foreach([torch.zeros(2)]) is False
    assert default_foreach([torch.zeros(2, device="meta")]) is True
    assert default_foreach([torch.zeros(2, device="meta"), torch.zeros(2)]) is False


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_complex_param_steps_exactly_as_its_real_view(optim_input, foreach):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(6, 3, dtype=torch.complex64, generator=gen)
    complex_param = nn.Parameter(values.clone())
    real_param = nn.Parameter(torch.view_as_real(values).clone())
    oc = GENIE([complex_param], seed=9, foreach=foreach, **optim_input.kwargs)
    orl = GENIE([real_param], seed=9, foreach=foreach, **optim_input.kwargs)
    for k in range(4):
        grad = torch.randn(6, 3, dtype=torch.complex64, generator=gen) * (3.0 if k % 2 else 0.01)
        complex_param.grad, real_param.grad = grad, torch.view_as_real(grad).clone()
        oc.step()
        orl.step()
    assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach())
    assert oc.state[complex_param]["m"].dtype == torch.complex64
    assert torch.equal(torch.view_as_real(oc.state[complex_param]["s"]), orl.state[real_param]["s"])
    _assert_state_dicts_equal(oc.state_dict() | {"state": {}}, orl.state_dict() | {"state": {}})
    assert oc.statistics() == orl.statistics()


def test_optimizer_can_be_printed():
    text = repr(_make(_model(), {}))
    assert re.search(r"GENIE \(\s*Parameter Group 0", text) and "beta: 0.95" in text


# ---------------------------------------------------------------------------
# CUDA (skipped with a reason where there is none)
# ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_cuda_foreach_and_forloop_agree_and_foreach_is_the_default(optim_input):
    a, b = _model().cuda(), _model().cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(4)]
    kwargs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in optim_input.kwargs.items()}
    oa, ob = _make(a, kwargs), _make(b, kwargs, foreach=False)
    assert default_foreach(list(a.parameters())) is True
    _train(a, oa, batches)
    _train(b, ob, batches)
    for x, y in zip(a.parameters(), b.parameters()):
        # CUDA's foreach kernels may round differently from the per-tensor ones.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_state_dict_loads_on_the_cpu_and_continues():
    model = _model().cuda()
    opt = _make(model, {})
    _train(model, opt, [(x.cuda(), y.cuda()) for x, y in _batches(2)])
    cpu_model = copy.deepcopy(model).cpu()
    cpu_opt = _make(cpu_model, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_opt.load_state_dict(opt.state_dict())
    assert all(st["m"].device.type == "cpu" for st in cpu_opt.state.values())
    _train(cpu_model, cpu_opt, _batches(1))
