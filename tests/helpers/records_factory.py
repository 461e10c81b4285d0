"""Hand-built records for selection and table tests."""

from __future__ import annotations

from genie_dg.results.records import Record, RunIdentity


def make_record(
    step: int,
    accuracy: dict[str, dict[str, float]],
    *,
    test: tuple[str, ...] = ("A",),
    domains: tuple[str, ...] = ("A", "B", "C"),
    hparams_seed: int = 0,
    trial_seed: int = 0,
    protocol: str = "lodo",
    train: tuple[str, ...] | None = None,
    dataset: str = "toy",
    optimizer: str = "GENIE",
    algorithm: str = "ERM",
) -> Record:
    if train is None:
        train = tuple(d for d in domains if d not in test)
    identity = RunIdentity(
        dataset=dataset,
        protocol=protocol,
        algorithm=algorithm,
        optimizer=optimizer,
        domains=domains,
        train_domains=train,
        test_domains=test,
        trial_seed=trial_seed,
        hparams_seed=hparams_seed,
        seed=trial_seed,
    )
    run_dir = f"{dataset}-{optimizer}-{algorithm}-{'+'.join(test)}-{'+'.join(train)}-t{trial_seed}-h{hparams_seed}"
    return Record(identity, step, accuracy, run_dir)


def lodo_record(step: int, source_out: float, target_in: float, target_out: float | None = None, **kw) -> Record:
    """A run with target A (or ``test``): every training domain's held-out accuracy ``source_out``."""
    test = kw.pop("test", ("A",))
    domains = kw.get("domains", ("A", "B", "C"))
    accuracy = {d: {"out": source_out} for d in domains if d not in test}
    for target in test:
        accuracy[target] = {"in": target_in} | ({} if target_out is None else {"out": target_out})
    return make_record(step, accuracy, test=test, **kw)
