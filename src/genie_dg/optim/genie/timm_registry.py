"""GENIE in timm's optimizer factory, registered by an explicit call (not on import)."""

from __future__ import annotations

from genie_dg.optim.genie.optimizer import GENIE


def register_timm() -> bool:
    """Make ``timm.optim.create_optimizer_v2(model, "genie", ...)`` build :class:`GENIE`.

    Idempotent; returns False (and changes nothing) when timm or its registry is unavailable.
    timm's factory passes ``weight_decay`` and, for a model, builds a no-decay group for biases
    and norm parameters; both are ordinary GENIE parameter groups.
    """
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError:
        return False
    try:
        if default_registry.get_optimizer_info("genie").opt_class is GENIE:
            return True
    except ValueError:
        pass
    default_registry.register(
        OptimInfo(
            name="genie",
            opt_class=GENIE,
            description="GENIE: OSGR-guided preconditioning with variance-gated noise and update dropout (ICML 2025)",
            has_eps=True,
            has_momentum=False,
            has_betas=False,
        )
    )
    return True
