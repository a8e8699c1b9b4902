"""Means with standard errors, for held-out accuracy and mean reward reports."""

import math
from collections.abc import Iterable


def accuracy_with_stderr(correct_flags: Iterable[bool]) -> tuple[float, float]:
    """Fraction correct and its binomial standard error sqrt(p(1-p)/n)."""
    flags = [bool(flag) for flag in correct_flags]
    if not flags:
        raise ValueError("accuracy of an empty set of items")
    p = sum(flags) / len(flags)
    return p, math.sqrt(p * (1.0 - p) / len(flags))


def mean_with_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1); stderr is nan for one value."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean of an empty set of values")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, math.nan
    variance = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(variance / n)
