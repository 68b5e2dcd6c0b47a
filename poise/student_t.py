"""Student's t distribution, the two functions the seed statistics need (poise/scoring.py), in plain Python.

scipy has them, but importing scipy.special takes a quarter of a second on an idle machine and more on a busy one,
which `poise status` would pay on every call for one interval and one p-value. Both go through the regularized
incomplete beta function I_x(a, b) (Abramowitz & Stegun 26.5.8 continued fraction, evaluated with the modified
Lentz method of Numerical Recipes §6.4):

    P(|T| > t) = I_{ν / (ν + t²)}(ν / 2, 1 / 2)        (A&S 26.7.1, ν degrees of freedom, any ν > 0)

tests/test_scoring.py checks them against scipy.stats to 1e-9.
"""

from __future__ import annotations

import math

_TINY = 1e-300  # keeps the Lentz recurrences away from division by zero
_EPS = 1e-15


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, 1000):
        # Two terms per step: the even one d_2m, then the odd one d_2m+1 (A&S 26.5.8).
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            fraction *= d * c
        if abs(d * c - 1.0) < _EPS:
            return fraction
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; else the symmetry I_x(a,b) = 1 - I_1-x(b,a)
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def two_sided_p(t: float, dof: float) -> float:
    """P(|T| > |t|) for T ~ Student's t with `dof` degrees of freedom."""
    return regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))


def quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p, for 1/2 <= p < 1 (the upper quantiles an interval needs), by bisection."""
    if not 0.5 <= p < 1.0:
        raise ValueError(f"quantile: p must be in [0.5, 1), got {p}")
    tail = 2.0 * (1.0 - p)  # the two-sided tail beyond the quantile
    low, high = 0.0, 1.0
    while two_sided_p(high, dof) > tail:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        low, high = (middle, high) if two_sided_p(middle, dof) > tail else (low, middle)
    return (low + high) / 2.0
