"""Seeds of a training run's random streams, each derived from the run's one base seed.

Every training sample and every training step gets its own seed, a pure function of (base seed,
index), so a resumed run draws the same numbers as an uninterrupted one, whatever the number of
data-loader workers or processes. The data loader indexes by draw number, the per-step hook (dropout,
drop path, MLM masking) by iteration x world size + rank.
"""

import random

__all__ = ["derived_seed", "fresh_seed"]

SEED_LIMIT = 2**31


def derived_seed(seed: int, index: int) -> int:
    """The seed, in [0, 2**31), of stream `index` of a run seeded with `seed`."""
    return (seed * 1_000_003 + index) % SEED_LIMIT


def fresh_seed() -> int:
    """A seed for a caller that gave none, drawn from Python's global generator so that Detectron2's
    per-worker seeding (or a user's ``random.seed``) still makes it reproducible."""
    return random.randrange(SEED_LIMIT)
