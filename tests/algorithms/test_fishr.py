from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from genie_dg.algorithms.base import DomainBatch
from genie_dg.algorithms.fishr import Fishr, head_gradients, variance_distance
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier


class TinyFeaturizer(nn.Linear):
    num_features = 3

    def __init__(self) -> None:
        super().__init__(4, 3)


def _network() -> Classifier:
    torch.manual_seed(0)
    return Classifier(TinyFeaturizer(), num_classes=2).double()


def _batches(num_domains: int = 2, seed: int = 1, same: bool = False) -> list[DomainBatch]:
    torch.manual_seed(seed)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    return [DomainBatch(x.clone() if same else x * (d + 1) + d, y, d) for d in range(num_domains)]


def _reference_head_gradients(head: nn.Linear, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients by torch.func, as BackPACK's BatchGrad gives them to DomainBed."""

    def loss(params, f, t):
        return F.cross_entropy(functional_call(head, params, (f.unsqueeze(0),)), t.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(dict(head.named_parameters()), features, y)
    return torch.cat([per_sample["weight"].flatten(1), per_sample["bias"]], dim=1)


def _reference_penalty(net: Classifier, batches: list[DomainBatch]) -> torch.Tensor:
    variances = []
    for b in batches:
        g = _reference_head_gradients(net.head, net.features(b.x), b.y)
        variances.append(((g - g.mean(0)) ** 2).mean(0))
    variances = torch.stack(variances)
    return ((variances - variances.mean(0)) ** 2).mean()


def test_head_gradients_equal_per_sample_autograd():
    net, [batch] = _network(), _batches(1)
    features = net.features(batch.x)
    got = head_gradients(features, net.head(features), batch.y)
    assert torch.allclose(got, _reference_head_gradients(net.head, features, batch.y))


def test_variance_distance_matches_hand_computation():
    # Domain variances (1, 3) and (3, 5): mean (2, 4), every deviation is 1.
    assert variance_distance(torch.tensor([[1.0, 3.0], [3.0, 5.0]])).item() == 1.0
    assert variance_distance(torch.tensor([[2.0, 7.0], [2.0, 7.0]])).item() == 0.0


def test_fishr_penalty_and_its_gradient_match_the_per_sample_autograd_reference():
    net, batches = _network(), _batches()
    fishr = Fishr(2, 2, 3, fishr_lambda=10.0, fishr_penalty_anneal_iters=0, fishr_ema=0.0).double()
    out = fishr.training_loss(net, batches)
    reference = _reference_penalty(net, batches)
    assert reference > 0
    assert torch.allclose(out.metrics["fishr_penalty"], reference)
    pooled = F.cross_entropy(net(torch.cat([b.x for b in batches])), torch.cat([b.y for b in batches]))
    assert torch.allclose(out.loss, pooled + 10.0 * reference)
    # The penalty trains the featurizer too, as DomainBed's create_graph=True does.
    got = torch.autograd.grad(out.loss - pooled, net.featurizer.weight)[0]
    expected = torch.autograd.grad(10.0 * reference, net.featurizer.weight)[0]
    assert got.abs().sum() > 0
    assert torch.allclose(got, expected)


def test_fishr_penalty_of_identical_domains_is_zero():
    fishr = Fishr(2, 2, 3, fishr_ema=0.0).double()
    assert fishr.training_loss(_network(), _batches(same=True)).metrics["fishr_penalty"].item() == 0.0


def test_fishr_moving_average_advances_once_per_step():
    net, fishr = _network(), Fishr(2, 2, 3, fishr_ema=0.5).double()
    first, second = _batches(seed=1), _batches(seed=2)

    def raw_variances(batches):
        gradients = [_reference_head_gradients(net.head, net.features(b.x), b.y) for b in batches]
        return torch.stack([((g - g.mean(0)) ** 2).mean(0) for g in gradients]).detach()

    v0, v1 = raw_variances(first), raw_variances(second)
    # Step 0 starts from zero; dividing by 1 - ema undoes the (1 - ema) weight of the new term.
    out = fishr.training_loss(net, first)
    assert torch.allclose(out.metrics["fishr_penalty"], variance_distance(v0))
    fishr.update_count += 1
    for _ in range(2):  # a re-evaluation in the same step must give the same penalty
        out = fishr.training_loss(net, second)
        assert torch.allclose(out.metrics["fishr_penalty"], variance_distance(0.5 * v0 + v1))
        assert torch.allclose(fishr.variance_ema, 0.25 * v0 + 0.5 * v1)


def test_fishr_penalty_weight_anneals_from_zero_at_the_configured_step():
    net, batches = _network(), _batches()
    fishr = Fishr(2, 2, 3, fishr_lambda=1000.0, fishr_penalty_anneal_iters=2, reset_optimizer_on_anneal=True)
    fishr = fishr.double()
    for step, weight in {0: 0.0, 1: 0.0, 2: 1000.0, 5: 1000.0}.items():
        fishr.update_count.fill_(step)
        out = fishr.training_loss(net, batches)
        assert out.metrics["fishr_penalty_weight"].item() == weight
        assert torch.allclose(out.loss, out.metrics["classification_loss"] + weight * out.metrics["fishr_penalty"])
        assert out.reset_optimizer == (step == 2), step
    # DomainBed does not reset when the penalty is on from step 0.
    at_zero = Fishr(2, 2, 3, fishr_penalty_anneal_iters=0, reset_optimizer_on_anneal=True).double()
    assert not at_zero.training_loss(net, batches).reset_optimizer


def test_fishr_refuses_a_single_training_domain_unless_allowed():
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        Fishr(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        fishr = Fishr(2, 1, 3, fishr_penalty_anneal_iters=0, allow_degenerate=True).double()
    net, [batch] = _network(), _batches(1)
    out = fishr.training_loss(net, [batch])
    assert out.metrics["fishr_penalty"].item() == 0.0
    assert torch.allclose(out.loss, F.cross_entropy(net(batch.x), batch.y))


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"fishr_ema": 1.0}, "fishr_ema"),
        ({"fishr_lambda": -1.0}, "fishr_lambda"),
        ({"fishr_penalty_anneal_iters": 1.5}, "fishr_penalty_anneal_iters"),
    ],
)
def test_fishr_rejects_invalid_hyperparameters(override, name):
    with pytest.raises(UserInputError, match=f"algorithm.{name}"):
        Fishr(2, 2, 3, **override)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_fishr_trains_and_checkpoints_its_moving_averages(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("fishr", optimizer, "algorithm.fishr_penalty_anneal_iters=1")
    assert trainer.callback_metrics["train/fishr_penalty_weight"] == 1000.0
    ema = model.algorithm.variance_ema
    assert ema.abs().sum() > 0
    state = saved_state(trainer)
    assert torch.equal(state["algorithm.variance_ema"], ema)
    assert int(state["algorithm.update_count"]) == 3


def _replica(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = _network()
        fishr = Fishr(2, 2, 3, fishr_lambda=10.0, fishr_penalty_anneal_iters=0, fishr_ema=0.5).double()
        batches = _batches(seed=10 + rank)  # every replica sees other examples
        out = fishr.training_loss(net, batches)
        out.loss.backward()
        grads = [p.grad for p in net.parameters()]
        torch.save({"ema": fishr.variance_ema, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e  # two gloo processes (DDP)
def test_fishr_replicas_keep_the_moving_average_of_the_whole_batch_and_its_gradient(tmp_path):
    """Under DDP each replica's variances come from its shard. The moving average must follow
    their mean on every replica, and the replicas' gradients, averaged as DDP does, must be
    those of the penalty of that mean."""
    torch.multiprocessing.spawn(_replica, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    net = _network()
    shards = [_batches(seed=10 + rank) for rank in (0, 1)]

    def variances(batches):
        gradients = [_reference_head_gradients(net.head, net.features(b.x), b.y) for b in batches]
        return torch.stack([((g - g.mean(0)) ** 2).mean(0) for g in gradients])

    mean_variances = (variances(shards[0]) + variances(shards[1])) / 2
    for r in (r0, r1):
        torch.testing.assert_close(r["ema"], 0.5 * mean_variances.detach())
    classification = sum(F.cross_entropy(net(torch.cat([b.x for b in s])), torch.cat([b.y for b in s])) for s in shards)
    (classification / 2 + 10.0 * variance_distance(mean_variances)).backward()
    for g0, g1, p in zip(r0["grads"], r1["grads"], net.parameters()):
        torch.testing.assert_close((g0 + g1) / 2, p.grad)
