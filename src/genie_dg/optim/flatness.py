"""What GAM and FAD share: several closure evaluations per step, a base optimizer for the update."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from pytorch_optimizer.base.exception import NoClosureError

Closure = Callable[[], torch.Tensor]


class FlatnessAwareOptimizer(torch.optim.Optimizer):
    """Base of optimizers that build a descent direction from gradients at several points.

    ``step(closure)`` evaluates the closure (zero the gradients, forward and backward pass) at
    the current and at perturbed weights, writes the combined direction into ``.grad`` at the
    original weights and lets ``base_optimizer`` (a class such as ``torch.optim.Adam``, built
    with ``base_kwargs``) make the update. Parameter groups and state are the base optimizer's,
    so its learning rate, schedule and checkpoint work as usual. The method's own
    hyper-parameters are attributes, not group entries, so that names such as ``alpha`` cannot
    collide with a base optimizer's (RMSprop's ``alpha``). Norms are global over all
    parameters, as in SAM; ``perturb_eps`` is the papers' xi, which keeps a normalisation
    finite when a vector vanishes.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        perturb_eps: float,
        **base_kwargs: Any,
    ) -> None:
        if perturb_eps <= 0:
            raise ValueError(f"perturb_eps must be positive, got {perturb_eps}")
        super().__init__(params, dict(base_kwargs))
        self.perturb_eps = perturb_eps
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch replaces param_groups and state with new objects; the base optimizer must see them.
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state

    def _evaluate(self, closure: Closure | None) -> torch.Tensor:
        if closure is None:
            raise NoClosureError(
                type(self).__name__,
                " It evaluates the loss at several points per step, so step() needs a closure that "
                "zeroes the gradients and runs the forward and backward pass.",
            )
        with torch.enable_grad():
            return closure()

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _unit(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``v / (||v|| + xi)``, the norm taken over all tensors together."""
        scale = 1.0 / (global_norm(vectors) + self.perturb_eps)
        return [v * scale for v in vectors]

    def _step_base(self, params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor]) -> None:
        for p, d in zip(params, direction):
            p.grad = d
        self.base_optimizer.step()


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm of all tensors taken together (as one flat vector)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def move_to(params: Sequence[torch.Tensor], origin: Sequence[torch.Tensor], *offsets: Sequence[torch.Tensor]) -> None:
    """Set the parameters to ``origin + sum(offsets)`` (copied, so no rounding drift accumulates)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(origin[i])
            for offset in offsets:
                p.add_(offset[i])


def gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of the parameters' current gradients."""
    return [p.grad.detach().clone() for p in params]
