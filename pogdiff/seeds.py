"""Seed derivation, the one place: a leaf module, so the config layer can derive a run's seeds too."""
from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from integers (numpy's SeedSequence): streams, steps and workers never share one."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
