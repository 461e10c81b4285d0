"""A dataset made of several domains that share one label space."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset


@dataclass
class DomainBatch:
    """One training domain's minibatch of a step (DomainBed's ``minibatches`` hold one each).

    ``domain`` is the domain's index in its dataset's ``domain_names``."""

    x: torch.Tensor
    y: torch.Tensor
    domain: int


@dataclass
class MultiDomainDataset:
    """Per-domain datasets with a shared class list, DomainBed-style.

    ``domains[i]`` yields ``(x, y)`` pairs; ``x`` is either a ready tensor (``transform`` is
    None, as for the MNIST variants) or raw input that the split views pass through
    ``train_transform`` (training only, augmentation allowed) or ``eval_transform``.
    """

    name: str
    domain_names: list[str]
    classes: list[str]
    input_shape: tuple[int, int, int]
    domains: list[Dataset]
    train_transform: Callable[[Any], Any] | None = None
    eval_transform: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if len(self.domain_names) != len(self.domains):
            raise ValueError(f"{self.name}: {len(self.domain_names)} domain names for {len(self.domains)} domains")
        for name, domain in zip(self.domain_names, self.domains):
            if len(domain) == 0:  # type: ignore[arg-type]
                raise ValueError(f"{self.name}: domain '{name}' has no samples")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def domain_index(self, domain: int | str) -> int:
        """Index of a domain given by index or name; raises with the valid choices."""
        from genie_dg.errors import UserInputError

        choices = ", ".join(f"{i}={n}" for i, n in enumerate(self.domain_names))
        if isinstance(domain, bool) or not isinstance(domain, (int, str)):
            raise UserInputError(f"{self.name}: domain {domain!r} is neither an index nor a name ({choices})")
        if isinstance(domain, int):
            if not 0 <= domain < len(self.domain_names):
                raise UserInputError(
                    f"{self.name}: domain index {domain} is out of range; it has "
                    f"{len(self.domain_names)} domains ({choices}): use e.g. dataset.test_domains=[0]"
                )
            return domain
        if domain not in self.domain_names:
            raise UserInputError(f"{self.name}: unknown domain '{domain}'; choose one of {choices}")
        return self.domain_names.index(domain)


class DomainSubset(Dataset):
    """Some samples of one domain, transformed, tagged with the domain's index."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        domain: int,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.domain = domain
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        x, y = self.base[self.indices[i]]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y), self.domain
