"""Leave-one-domain-out splits and balanced per-domain training batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Sampler, default_collate

from genie_dg.data.multidomain import DomainBatch, DomainSubset, MultiDomainDataset
from genie_dg.errors import UserInputError


class BalancedDomainBatchSampler(Sampler[list[int]]):
    """Endless batches of ``batch_size`` samples from every domain, concatenated in domain order.

    ``domain_sizes`` are the lengths of the consecutive blocks of a ``ConcatDataset``. Each
    domain is walked through seeded permutations (without replacement within a pass, a fresh
    permutation per pass), so one step's batch is one minibatch per domain, as in DomainBed.
    Under data parallelism every rank draws the same permutation and takes its own stride of
    it, so ranks never share a sample within a pass. ``start_batch`` skips that many batches,
    so a run resumed at step k sees exactly the batches an uninterrupted run sees from step k.
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise UserInputError(f"batch_size={batch_size}: it must be at least 1")
        if min(domain_sizes) < world_size:
            raise UserInputError(f"a training domain has fewer samples than the {world_size} ranks")
        self.domain_sizes = list(domain_sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def _stream(self, domain: int, offset: int) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + domain)
        while True:
            order = torch.randperm(self.domain_sizes[domain], generator=generator)
            yield from (order[self.rank :: self.world_size] + offset).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        offsets = [sum(self.domain_sizes[:d]) for d in range(len(self.domain_sizes))]
        streams = [self._stream(d, off) for d, off in enumerate(offsets)]
        for _ in range(self.start_batch * self.batch_size):
            for stream in streams:
                next(stream)
        while True:
            yield [next(s) for s in streams for _ in range(self.batch_size)]


@dataclass(frozen=True)
class PerDomainCollate:
    """Collates a :class:`BalancedDomainBatchSampler` batch into one :class:`DomainBatch` per
    training domain, in domain order, so a training step receives DomainBed's ``minibatches``."""

    batch_size: int

    def __call__(self, samples: list[tuple[Any, ...]]) -> list[DomainBatch]:
        x, y, domain = default_collate(samples)
        return [
            DomainBatch(xs, ys, int(ds[0]))
            for xs, ys, ds in zip(x.split(self.batch_size), y.split(self.batch_size), domain.split(self.batch_size))
        ]


def accuracy_key(stage: str, name: str) -> str:
    """The logged metric of an evaluation set's accuracy: ``<stage>/<name>/acc``, stage ``val``
    (during training) or ``test`` (the selected checkpoint)."""
    return f"{stage}/{name}/acc"


@dataclass(frozen=True)
class EvalSet:
    """One evaluation loader: a domain, whether it was seen in training, and whether it is the
    held-out part of a target domain (DomainBed's test-domain validation split, read only by
    oracle model selection) rather than the part whose accuracy is reported."""

    domain: str
    is_target: bool
    is_target_validation: bool = False

    @property
    def name(self) -> str:
        """The name its accuracy is logged under: the domain, or ``<domain>/out`` for a target's
        held-out part."""
        return f"{self.domain}/out" if self.is_target_validation else self.domain

    @property
    def role(self) -> str:
        """``source`` (a training domain's held-out part: training-domain validation, the
        selection metric), ``target`` (the reported part of an unseen domain) or
        ``target_validation`` (an unseen domain's held-out part, read only by oracle selection)."""
        if self.is_target_validation:
            return "target_validation"
        return "target" if self.is_target else "source"

    def metric_key(self, stage: str) -> str:
        return accuracy_key(stage, self.name)

    @property
    def split(self) -> str:
        """DomainBed's name of the split evaluated: ``in`` for a target's reported part, ``out``
        for a held-out part."""
        return "in" if self.role == "target" else "out"


PROTOCOLS = ("lodo", "sdg")


class MultiDomainDataModule(LightningDataModule):
    """Builds the DG splits of a :class:`MultiDomainDataset` under a protocol.

    - ``protocol="lodo"`` (leave-one-domain-out, DomainBed's): the target domains are
      ``test_domains`` (one or more), every other domain is a training domain;
    - ``protocol="sdg"`` (single-domain generalization): the one domain in ``train_domains``
      is trained on, every other domain is a target;
    - from each training domain a seeded ``holdout_fraction`` is held out (unaugmented) for
      validation and model selection, the rest is trained on; target domains are never
      trained on and are evaluated whole, or, with ``target_holdout=True``, split the same way
      (DomainBed's "out" and "in" splits of every environment): the held-out part is evaluated
      for oracle model selection and the accuracy reported is that of the rest.

    Domains are given by index or name.

    ``train_dataloader`` yields a list of :class:`DomainBatch`, one per training domain, each
    of ``batch_size`` samples. Validation and test loaders come in :attr:`eval_sets` order: the
    held-out slice of each training domain, then each target domain, then (with
    ``target_holdout``) the held-out part of each target domain.
    """

    def __init__(
        self,
        dataset: Callable[[], MultiDomainDataset],
        test_domains: Sequence[int | str] | None = (0,),
        protocol: str = "lodo",
        train_domains: Sequence[int | str] | None = None,
        holdout_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        split_seed: int = 0,
        target_holdout: bool = False,
    ) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise UserInputError(f"dataset.protocol={protocol!r}: choose protocol=lodo or protocol=sdg")
        if protocol == "lodo" and train_domains is not None:
            raise UserInputError(
                "protocol=lodo trains on every domain outside dataset.test_domains, so "
                "dataset.train_domains must stay null; use protocol=sdg to train on a single domain"
            )
        if protocol == "sdg" and test_domains is not None:
            raise UserInputError(
                "protocol=sdg tests on every domain but the training one, so dataset.test_domains "
                "must stay null; choose the training domain with dataset.train_domains=[<domain>]"
            )
        if not 0.0 < holdout_fraction < 1.0:
            raise UserInputError(f"dataset.holdout_fraction={holdout_fraction}: it must lie strictly between 0 and 1")
        if batch_size < 1 or eval_batch_size < 1:
            raise UserInputError(
                f"dataset.batch_size={batch_size}, dataset.eval_batch_size={eval_batch_size}: both must be at least 1"
            )
        if num_workers < 0:
            raise UserInputError(f"dataset.num_workers={num_workers}: it must be 0 or more")
        self.build_dataset = dataset
        self.protocol = protocol
        self.requested_test_domains = list(test_domains or [])
        self.requested_train_domains = list(train_domains or [])
        self.holdout_fraction = holdout_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.target_holdout = target_holdout
        self.data: MultiDomainDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = self.build_dataset()
        train, test = self._split_domains(data)
        self.data, self.train_domains, self.test_domains = data, train, test
        self.train_parts: list[DomainSubset] = []
        self.holdout_parts: list[DomainSubset] = []
        for d in train:
            holdout, rest = self._holdout_split(data, d)
            self.train_parts.append(DomainSubset(data.domains[d], rest, d, data.train_transform))
            self.holdout_parts.append(DomainSubset(data.domains[d], holdout, d, data.eval_transform))
        self.target_parts: list[DomainSubset] = []
        self.target_holdout_parts: list[DomainSubset] = []
        for d in test:
            if self.target_holdout:
                holdout, rest = self._holdout_split(data, d)
                self.target_holdout_parts.append(DomainSubset(data.domains[d], holdout, d, data.eval_transform))
            else:
                rest = list(range(len(data.domains[d])))
            self.target_parts.append(DomainSubset(data.domains[d], rest, d, data.eval_transform))

    def _holdout_split(self, data: MultiDomainDataset, d: int) -> tuple[list[int], list[int]]:
        """(held-out, rest) sample indices of domain ``d``, seeded by the split seed and the domain."""
        size = len(data.domains[d])
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.split_seed * 997 + d))
        n_holdout = max(1, int(size * self.holdout_fraction))
        if size - n_holdout < 1:
            raise UserInputError(f"{data.name}: domain '{data.domain_names[d]}' is too small to split")
        return order[:n_holdout].tolist(), order[n_holdout:].tolist()

    def _split_domains(self, data: MultiDomainDataset) -> tuple[list[int], list[int]]:
        """(training, target) domain indices under the protocol."""
        every = range(len(data.domain_names))
        if self.protocol == "sdg":
            train = sorted({data.domain_index(d) for d in self.requested_train_domains})
            if len(train) != 1:
                raise UserInputError(
                    f"protocol=sdg trains on exactly one domain, got dataset.train_domains="
                    f"{self.requested_train_domains}; e.g. dataset.train_domains=[{data.domain_names[0]}]"
                )
            if len(data.domain_names) < 2:
                raise UserInputError(f"protocol=sdg needs a second domain to test on; {data.name} has one")
            return train, [i for i in every if i not in train]
        test = sorted({data.domain_index(d) for d in self.requested_test_domains})
        if not test:
            raise UserInputError("dataset.test_domains is empty: name at least one unseen domain")
        train = [i for i in every if i not in test]
        if not train:
            raise UserInputError(
                f"dataset.test_domains covers all {len(test)} domains of {data.name}: "
                "leave at least one domain to train on"
            )
        return train, test

    @property
    def dataset(self) -> MultiDomainDataset:
        if self.data is None:
            raise RuntimeError("call setup() before using the data module")
        return self.data

    @property
    def train_domain_names(self) -> tuple[str, ...]:
        """The training domains by name (``train_domains`` holds their indices), in order."""
        return tuple(self.dataset.domain_names[d] for d in self.train_domains)

    @property
    def test_domain_names(self) -> tuple[str, ...]:
        """The target domains by name (``test_domains`` holds their indices), in order."""
        return tuple(self.dataset.domain_names[d] for d in self.test_domains)

    @property
    def eval_sets(self) -> list[EvalSet]:
        held_out_targets = self.test_domain_names if self.target_holdout else ()
        return (
            [EvalSet(name, False) for name in self.train_domain_names]
            + [EvalSet(name, True) for name in self.test_domain_names]
            + [EvalSet(name, True, is_target_validation=True) for name in held_out_targets]
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size, start = 0, 1, 0
        if trainer is not None:
            rank, world_size = trainer.global_rank, trainer.world_size
            # Lightning builds this loader after restoring a checkpoint: continue where it stopped.
            start = trainer.global_step * trainer.accumulate_grad_batches
        sampler = BalancedDomainBatchSampler(
            [len(p) for p in self.train_parts], self.batch_size, self.split_seed, rank, world_size, start
        )
        return DataLoader(
            ConcatDataset(self.train_parts),
            batch_sampler=sampler,
            collate_fn=PerDomainCollate(self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loaders(self) -> list[DataLoader]:
        return [
            DataLoader(part, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)
            for part in self.holdout_parts + self.target_parts + self.target_holdout_parts
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()
