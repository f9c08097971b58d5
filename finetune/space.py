"""The search space of a :class:`~configs.finetune.TuningConfig` as a Nevergrad parametrization.

``log`` → ``ng.p.Log``, ``float`` → ``ng.p.Scalar``, ``int`` → an integer-cast scalar, ``ordered`` →
``ng.p.TransitionChoice`` (neighbours are related, e.g. batch sizes), ``choice`` → a deterministic
``ng.p.Choice``. A plain random ``Choice`` would make NGOpt treat the problem as noisy.
"""

from __future__ import annotations

from typing import Any

import nevergrad as ng
import numpy as np

from configs.finetune import Dimension, TuningConfig


def parameter(dim: Dimension) -> ng.p.Parameter:
    if dim.kind == "log":
        return ng.p.Log(lower=dim.low, upper=dim.high)
    if dim.kind == "float":
        return ng.p.Scalar(lower=dim.low, upper=dim.high)
    if dim.kind == "int":
        return ng.p.Scalar(lower=dim.low, upper=dim.high).set_integer_casting()
    if dim.kind == "ordered":
        return ng.p.TransitionChoice(list(dim.values))
    return ng.p.Choice(list(dim.values), deterministic=True)


def parametrization(tuning: TuningConfig, seed: int) -> ng.p.Dict:
    """The space as a Nevergrad parameter with its own seeded random state (replays ask the same points)."""
    param = ng.p.Dict(**{d.name: parameter(d) for d in tuning.dimensions})
    param.random_state = np.random.RandomState(seed)
    return param


def plain_value(v: Any) -> Any:
    """A numpy scalar (what Nevergrad hands back) as the plain Python value."""
    if isinstance(v, np.generic):
        return v.item()
    return v
