"""Summary statistics the experiments report: mean and standard error over seeds. Nothing else."""

from __future__ import annotations

import statistics


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of the non-None values; (nan, nan) for none, s.e. 0 for one."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.mean(values), se
