"""Typed run keys: an ``Arm`` is a training setting without its seed, shared by the plan and the analysis.

A run's directory name is computed from its full settings (every field that differs from
``TrainConfig``'s defaults, and the seed), so two studies that need the same run share it,
and no analysis retypes a name that the plan made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .sweep import Run
from .train import TrainConfig

_ALWAYS = ("method", "lr", "epochs")
_NEVER = ("seed", "data_dir", "device")  # the seed ends the name; data and device are the sweep's business


def run_name(config: TrainConfig) -> str:
    """``backforward-lr0.05-e40-depth=2-track_ics-s0``: method, lr, epochs, then every non-default setting."""
    defaults = TrainConfig()
    parts = [config.method, f"lr{config.lr:g}", f"e{config.epochs}"]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in _ALWAYS or f.name in _NEVER or value == getattr(defaults, f.name):
            continue
        if f.name == "init_from":
            value = Path(value).name
        parts.append(f.name if value is True else f"{f.name}={value:g}" if isinstance(value, float)
                     else f"{f.name}={value}")
    return "-".join(parts) + f"-s{config.seed}"


@dataclass(frozen=True)
class Arm:
    """One setting (``config``, its seed ignored) run once per seed in ``seeds``; with ``start_from``, each
    seed's run starts from the final model of that arm's run of the same seed (fine-tuning)."""

    config: TrainConfig
    seeds: tuple[int, ...]
    start_from: Arm | None = None

    def with_seed(self, seed: int) -> TrainConfig:
        return replace(self.config, seed=seed)

    def run(self, seed: int) -> Run:
        source = self.start_from.run(seed) if self.start_from is not None else None
        name = run_name(self.with_seed(seed)) + (f"-from-{source.name}" if source is not None else "")
        return Run(name, self.with_seed(seed), start_from=source)

    def runs(self) -> list[Run]:
        return [self.run(s) for s in self.seeds]

    def of(self, metrics: Mapping[str, list[dict]]) -> list[list[dict]]:
        """This arm's runs' metrics, in seed order."""
        return [metrics[self.run(s).name] for s in self.seeds]

    def but(self, **changes) -> Arm:
        return Arm(replace(self.config, **changes), self.seeds, self.start_from)

    def starting_from(self, source: Arm) -> Arm:
        return Arm(self.config, self.seeds, source)

    @property
    def epochs(self) -> int:
        return self.config.epochs


def arm(seeds: int | Sequence[int], **settings) -> Arm:
    """``arm(5, method="backforward", lr=0.05)``: seeds 0..4 (or the seeds given) of that setting."""
    return Arm(TrainConfig(**settings), tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds))


def plan(arms: Iterable[Arm]) -> list[Run]:
    """Every run of the arms and the runs they start from, each once (arms of different studies may share runs)."""
    unique: dict[str, Run] = {}
    for a in arms:
        for run in a.runs():
            while run is not None:
                unique.setdefault(run.name, run)
                run = run.start_from
    return list(unique.values())


def longest_first(runs: Sequence[Run]) -> list[Run]:
    """Runs ordered by a rough cost (epochs × stages, squared for Backforward, doubled with ICS metering),
    longest first, so parallel workers finish together instead of one waiting on a long last run."""
    def cost(run: Run) -> float:
        c = run.config
        stages = c.depth + 1 if c.arch != "resmlp" else 2 * c.depth + 2
        return c.epochs * stages ** (2 if c.method == "backforward" else 1) * (2 if c.track_ics else 1)

    return sorted(runs, key=cost, reverse=True)
