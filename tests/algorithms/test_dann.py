from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.dann import CDANN, DANN, class_balanced_cross_entropy, discriminator_mlp
from genie_dg.errors import UserInputError
from genie_dg.pipeline import build

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def _run(algorithm, module, steps: int, batches: list[DomainBatch]) -> str:
    """Train ``steps`` steps through ``module``; returns the optimizer stepped at each, 'D' or 'G'."""
    stepped: list[str] = []
    for name, optimizer in zip("DG", module.context.optimizers):
        optimizer.register_step_post_hook(lambda *_, name=name: stepped.append(name))
    for step in range(steps):
        algorithm.manual_step(module.context, batches)
        assert module.steps == step + 1, "exactly one optimizer step per training step"
        algorithm.update_count += 1
    return "".join(stepped)


def test_discriminator_is_domainbeds_mlp():
    mlp = discriminator_mlp(inputs=5, outputs=3, width=7, depth=4, dropout=0.5)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.Dropout, nn.ReLU] * 3 + [nn.Linear]
    shapes = [tuple(m.weight.shape) for m in mlp if isinstance(m, nn.Linear)]
    assert shapes == [(7, 5), (7, 7), (7, 7), (3, 7)]
    assert all(m.p == 0.5 for m in mlp if isinstance(m, nn.Dropout))


def test_class_balanced_cross_entropy_weighs_each_class_equally():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 1, 1])
    classes = torch.tensor([0, 0, 1])
    ce = F.cross_entropy(logits, targets, reduction="none")
    # class 0 has two samples, class 1 one: weights 1/(2*2), 1/(2*2), 1/(1*2)
    expected = ce[0] / 4 + ce[1] / 4 + ce[2] / 2
    assert torch.allclose(class_balanced_cross_entropy(logits, targets, classes), expected)


@pytest.mark.parametrize(
    ("d_steps_per_g_step", "expected"),
    # DomainBed: counter t = 1, 2, ...; discriminator step iff t % (1 + d) < d.
    [(1, "GDGDGD"), (2, "DGDDGDDG"), (3, "DDGDDDGD")],
)
def test_discriminator_and_generator_alternate_by_d_steps_per_g_step(
    d_steps_per_g_step, expected, make_network, make_batches, manual_module
):
    network = make_network()
    dann = DANN(2, 2, 3, d_steps_per_g_step=d_steps_per_g_step, mlp_width=4)
    module = manual_module(network, dann.configure_optimizers(network, SGD))
    assert _run(dann, module, len(expected), make_batches()) == expected


def test_discriminator_step_moves_only_the_discriminator_and_generator_step_only_the_network(
    make_network, make_batches, manual_module
):
    network = make_network()
    dann = DANN(2, 2, 3, d_steps_per_g_step=1, mlp_width=4)
    optimizers = dann.configure_optimizers(network, SGD)
    module = manual_module(network, optimizers)
    for step, trains in enumerate(["network", "discriminator"]):
        net_before = [p.detach().clone() for p in network.parameters()]
        disc_before = [p.detach().clone() for p in dann.discriminator.parameters()]
        out = dann.manual_step(module.context, make_batches())
        net_moved = any(not torch.equal(a, p) for a, p in zip(net_before, network.parameters()))
        disc_moved = any(not torch.equal(a, p) for a, p in zip(disc_before, dann.discriminator.parameters()))
        assert (net_moved, disc_moved) == (trains == "network", trains == "discriminator"), step
        assert out.metrics["discriminator_step"].item() == float(trains == "discriminator")
        dann.update_count += 1


def test_generator_loss_is_classification_minus_lambda_times_discriminator_loss(
    make_network, make_batches, manual_module
):
    network, batches = make_network(), make_batches()
    dann = DANN(2, 2, 3, dann_lambda=0.3, mlp_width=4)
    optimizers = dann.configure_optimizers(network, functools.partial(torch.optim.SGD, lr=0.0))
    x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
    domains = torch.tensor([0] * 6 + [1] * 6)
    classification = F.cross_entropy(network(x), y)
    disc = F.cross_entropy(dann.discriminator(x), domains)
    out = dann.manual_step(manual_module(network, optimizers).context, batches)  # step 0: generator
    assert out.metrics["discriminator_step"].item() == 0.0
    assert torch.allclose(out.loss, classification - 0.3 * disc)
    assert torch.allclose(out.metrics["discriminator_loss"], disc)


def test_gradient_penalty_is_the_squared_input_gradient_norm_in_closed_form():
    torch.manual_seed(2)
    dann = DANN(2, 2, 3, grad_penalty=0.7, mlp_width=5, mlp_depth=2)
    features = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    domains = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, penalty = dann.discriminator_loss(features, y, domains)
    first, last = dann.discriminator[0], dann.discriminator[3]
    hidden = features @ first.weight.T + first.bias
    logits = hidden.relu() @ last.weight.T + last.bias
    # d(sum of cross-entropies)/d features = ((softmax - onehot) W2 * relu'(h)) W1
    residual = logits.softmax(-1) - F.one_hot(domains, 2)
    input_grad = ((residual @ last.weight) * (hidden > 0)) @ first.weight
    expected = input_grad.pow(2).sum(1).mean()
    assert torch.allclose(penalty, expected, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(logits, domains) + 0.7 * expected, atol=1e-6)
    assert DANN(2, 2, 3, grad_penalty=0.0).discriminator_loss(features, y, domains)[1] is None


def test_cdann_discriminator_sees_class_embeddings_with_class_balanced_loss():
    torch.manual_seed(3)
    cdann = CDANN(2, 2, 3, mlp_width=4)
    assert not hasattr(DANN(2, 2, 3), "class_embeddings")
    features = torch.randn(5, 3)
    y = torch.tensor([0, 1, 1, 1, 0])
    domains = torch.tensor([0, 0, 1, 1, 1])
    logits = cdann.discriminator(features + cdann.class_embeddings.weight[y])
    expected = class_balanced_cross_entropy(logits, domains, y)
    loss, _ = cdann.discriminator_loss(features, y, domains)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(cdann.discriminator(features), domains))


def test_optimizers_take_dann_overrides_and_domainbeds_betas_where_the_optimizer_has_them(make_network):
    network = make_network()
    dann = DANN(2, 2, 3, lr_d=1e-2, weight_decay_d=1e-4, lr_g=None, weight_decay_g=None, beta1=0.5)
    adam = functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=0.0)
    discriminator, generator = dann.configure_optimizers(network, adam)
    assert discriminator.param_groups[0]["lr"] == 1e-2
    assert discriminator.param_groups[0]["weight_decay"] == 1e-4
    assert discriminator.param_groups[0]["betas"] == (0.5, 0.9)
    assert generator.param_groups[0]["lr"] == 1e-3
    assert generator.param_groups[0]["betas"] == (0.5, 0.9)
    assert {id(p) for p in discriminator.param_groups[0]["params"]} == {id(p) for p in dann.parameters()}
    assert {id(p) for p in generator.param_groups[0]["params"]} == {id(p) for p in network.parameters()}
    kept = DANN(2, 2, 3, beta1=None).configure_optimizers(network, adam)
    assert kept[0].param_groups[0]["betas"] == (0.9, 0.999)
    sgd = dann.configure_optimizers(network, functools.partial(torch.optim.SGD, lr=0.05))
    assert "betas" not in sgd[0].param_groups[0] and sgd[1].param_groups[0]["lr"] == 0.05


def test_dann_rejects_bad_hyper_parameters():
    with pytest.raises(UserInputError, match="algorithm.d_steps_per_g_step"):
        DANN(2, 2, 3, d_steps_per_g_step=0)
    with pytest.raises(UserInputError, match="algorithm.mlp_depth"):
        DANN(2, 2, 3, mlp_depth=1)
    with pytest.raises(UserInputError, match="algorithm.beta1"):
        CDANN(2, 2, 3, beta1=1.0)
    with pytest.raises(UserInputError, match="algorithm.lr_d"):
        DANN(2, 2, 3, lr_d=0.0)


@pytest.mark.parametrize("cls", [DANN, CDANN])
def test_dann_refuses_a_single_training_domain_unless_allowed(cls, make_network, make_batches, manual_module):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        cls(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        dann = cls(2, 1, 3, allow_degenerate=True, d_steps_per_g_step=2, mlp_width=4)
    network, batches = make_network(), make_batches(n_domains=1)
    before = F.cross_entropy(network(batches[0].x), batches[0].y)
    module = manual_module(network, dann.configure_optimizers(network, SGD))
    assert _run(dann, module, 3, batches) == "GGG", "ERM: only generator steps"
    assert F.cross_entropy(network(batches[0].x), batches[0].y) < before


def _optimizer_steps(trainer) -> list[int]:
    """Steps each optimizer in ``last.ckpt`` made, [discriminator, generator]."""
    path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    states = torch.load(path, weights_only=True)["optimizer_states"]
    return [int(next(iter(s["state"].values()))["step"]) for s in states]


@pytest.mark.parametrize(
    ("algorithm", "optimizer"), [("dann", "genie"), ("dann", "adam"), ("cdann", "genie"), ("cdann", "adam")]
)
def test_dann_trains_checkpoints_the_discriminator_and_reloads_it(
    train_algorithm, saved_state, make_config, small_run, algorithm, optimizer
):
    model, trainer = train_algorithm(algorithm, optimizer)
    # Steps 1-3 with d_steps_per_g_step=1: generator, discriminator, generator.
    assert _optimizer_steps(trainer) == [1, 2]
    state = saved_state(trainer)
    keys = ["algorithm.discriminator.0.weight", "algorithm.discriminator.6.bias"]
    if algorithm == "cdann":
        keys.append("algorithm.class_embeddings.weight")
    trained = model.state_dict()
    for key in keys:
        assert torch.equal(state[key], trained[key].cpu()), key
    _, fresh, _, _ = build(make_config(f"algorithm={algorithm}", f"optimizer={optimizer}", *small_run))
    assert not torch.equal(fresh.state_dict()[keys[0]], state[keys[0]]), "the discriminator trained"
    fresh.load_state_dict(state)
    for key in keys:
        assert torch.equal(fresh.state_dict()[key], state[key]), key
