"""What a comparison protocol runs: its settings' lengths and methods, and every method's
budget (trials and seeds). Plain data, shared by `protocol` and `cost`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhpro_lab import convergence
from fedhpro_lab.suites import Setting
from fedhpro_lab.tuning import RECHECK_OFFSET, TRIALS, Length

TUNING_SEED = 100
SEEDS = (0, 1, 2, 3, 4)
PUBLISHED_SEEDS = 3  # the published recipes are context, not the comparison: fewer seeds


@dataclass(frozen=True)
class ProtocolSetting:
    setting: Setting
    rounds: int  # the tuning's full length, and the table's least length
    methods: tuple[str, ...]
    cap: int = convergence.MAX_ROUNDS  # the longest the table may grow to
    grow: bool = True  # False: the table runs exactly `rounds`

    @property
    def length(self) -> Length:
        return Length(self.rounds, max(self.cap, self.rounds), self.grow)


@dataclass(frozen=True)
class Budget:
    """What every method gets in every setting: trials, and the table's seeds."""

    trials: int = TRIALS
    seeds: tuple[int, ...] = SEEDS
    published_seeds: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.published_seeds:
            object.__setattr__(self, "published_seeds", self.seeds[:PUBLISHED_SEEDS])
        if TUNING_SEED in self.seeds or TUNING_SEED + RECHECK_OFFSET in self.seeds:
            raise ValueError(f"seeds {TUNING_SEED} and {TUNING_SEED + RECHECK_OFFSET} are the "
                             f"tuning's; the table needs others")
