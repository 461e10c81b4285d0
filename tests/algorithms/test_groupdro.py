from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms.base import DomainBatch
from genie_dg.algorithms.groupdro import GroupDRO
from genie_dg.errors import UserInputError


def _batches(num_domains: int = 3) -> list[DomainBatch]:
    torch.manual_seed(1)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    return [DomainBatch(torch.randn(6, 3) * (d + 1), y, d) for d in range(num_domains)]


def test_groupdro_weights_follow_exponentiated_risks_once_per_step(make_network):
    net, batches = make_network(), _batches()
    dro = GroupDRO(2, 3, 3, groupdro_eta=0.5)
    risks = torch.stack([F.cross_entropy(net(b.x), b.y) for b in batches]).detach()
    assert torch.allclose(dro.q, torch.full((3,), 1 / 3))

    out = dro.training_loss(net, batches)
    q1 = torch.softmax(0.5 * risks, 0)
    assert torch.allclose(dro.q, q1)
    assert torch.allclose(out.loss, (q1 * risks).sum())
    assert dro.q.argmax() == risks.argmax(), "the worst domain gets the most weight"

    again = dro.training_loss(net, batches)
    assert torch.allclose(dro.q, q1), "a re-evaluation in the same step must not move q"
    assert torch.allclose(again.loss, out.loss)

    dro.update_count += 1
    dro.training_loss(net, batches)
    assert torch.allclose(dro.q, torch.softmax(2 * 0.5 * risks, 0))


def test_groupdro_with_a_single_domain_is_erm(make_network):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        GroupDRO(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        dro = GroupDRO(2, 1, 3, allow_degenerate=True)
    net, [batch] = make_network(), _batches(1)
    out = dro.training_loss(net, [batch])
    assert torch.allclose(out.loss, F.cross_entropy(net(batch.x), batch.y))
    assert dro.q.tolist() == [1.0]


def test_groupdro_rejects_negative_eta():
    with pytest.raises(UserInputError, match="algorithm.groupdro_eta"):
        GroupDRO(2, 2, 3, groupdro_eta=-0.1)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_groupdro_trains_and_checkpoints_its_domain_weights(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("groupdro", optimizer)
    q = model.algorithm.q
    assert q.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(q, torch.full_like(q, 1 / len(q))), "three updates moved q"
    state = saved_state(trainer)
    assert torch.equal(state["algorithm.q"], q)
    assert int(state["algorithm.update_count"]) == 3


def _replica(rank: int, init_file: str, eta: float, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        y = torch.tensor([0, 1, 0, 1, 1, 0])
        gen = torch.Generator().manual_seed(rank)  # every replica sees other examples
        batches = [DomainBatch(torch.randn(6, 3, generator=gen) * (d + 1), y, d) for d in range(3)]
        dro = GroupDRO(2, 3, 3, groupdro_eta=eta)
        dro.training_loss(net, batches)
        risks = torch.stack([F.cross_entropy(net(b.x), b.y) for b in batches]).detach()
        torch.save({"q": dro.q, "risks": risks}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e  # two gloo processes (DDP)
def test_groupdro_replicas_weight_domains_by_the_risks_of_the_whole_batch(tmp_path):
    """Under DDP each replica's risks come from its own shard; q must follow their mean, as
    on one device with the whole batch (DDP would otherwise broadcast rank 0's q)."""
    eta = 0.5
    torch.multiprocessing.spawn(_replica, args=(str(tmp_path / "init"), eta, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.allclose(r0["risks"], r1["risks"])
    expected = torch.softmax(eta * (r0["risks"] + r1["risks"]) / 2, 0)
    for r in (r0, r1):
        torch.testing.assert_close(r["q"], expected)
