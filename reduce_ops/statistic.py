"""`plan.statistic`: which statistic of a fault rate's repetitions plans its retraining. A module
of its own, without numpy or pandas, so that reading params stays light (config checks it)."""

from __future__ import annotations

import math
import numbers

from reduce_ops.errors import ConfigError

_STATISTIC_HELP = "expected 'max', 'mean' or 'qP' with 0<P<=1"


def parse_statistic(s) -> str | float:
    """Read `plan.statistic`: 'max', 'mean', or a quantile as 'q0.9' or a float in (0, 1]."""
    if isinstance(s, str):
        text = s.strip().lower()
        if text in ("max", "mean"):
            return text
        if text.startswith("q"):
            try:
                q = float(text[1:])
            except ValueError:
                q = math.nan
            if 0 < q <= 1:
                return q
    elif isinstance(s, numbers.Real) and not isinstance(s, bool):    # numpy's numbers too
        if 0 < float(s) <= 1:
            return float(s)
    raise ConfigError(f"plan.statistic: {_STATISTIC_HELP}, got {s!r}")
