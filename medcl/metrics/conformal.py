"""Post-hoc calibration: temperature scaling and split-conformal prediction sets.

**Temperature scaling** (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
the class scores are divided by one scalar ``T > 0`` fitted by minimising the negative
log-likelihood on held-out data; the arg-max, hence accuracy, never changes. medcl fits it on probabilities: ``log p`` differs from the
scores by a per-row constant, so ``softmax(log p / T) == softmax(scores / T)``.

**Conformal prediction sets** (split conformal: Vovk et al., *Algorithmic Learning in a Random
World*, 2005; Angelopoulos and Bates, "A Gentle Introduction to Conformal Prediction", 2021).
A non-conformity score ``s(x, k)`` is computed on held-out calibration rows at their labels;
``qhat`` is the ``ceil((n + 1)(1 - alpha))``-th smallest; the set of a new input is every class
``k`` with ``s(x, k) <= qhat``, plus its top class (so a set is never empty; adding a class only
raises coverage). Then ``P(y in set) >= 1 - alpha`` for an input exchangeable with the
calibration rows. Two scores:

- ``"lac"`` (default): ``s = 1 - p_k``, the least-ambiguous sets of Sadinle, Lei and Wasserman
  (JASA 2019): a class enters when its calibrated probability is at least ``1 - qhat``, so an
  input whose two top classes are close gets both ("uncertain between these two").
- ``"aps"``: the mass of the classes ranked at or above ``k`` (Romano, Sesia and Candès,
  NeurIPS 2020), without its randomisation (one input, one set, in every backend); on two
  classes its second class always scores 1, so every set has the same size: use it with more.

**Mondrian variants** (Vovk et al., 2005, ch. 4): thresholds per group of calibration rows give
coverage per group. ``"site"``: one threshold per site (experience), so coverage holds per site,
not only on average. ``"class"``: one per class (Sadinle et al.'s class-specific coverage),
which keeps coverage under a change of class prevalence (label shift; Podkopaev and Ramdas,
UAI 2021). ``"site_class"`` (default): one per (site, class), both at once. When an input's site
is unknown the largest threshold over sites is used, per class, which covers at least as often
as each site's own. A group with fewer than ``1 / alpha - 1`` calibration rows has no finite
threshold: its class is in every set (valid, uninformative, reported); a class with no
calibration rows at a site (class-incremental streams: each site has its own classes) enters
that site's sets only as the top class.

**Marginal or training-conditional.** The guarantee above is marginal: averaged over the draw of
the calibration rows. One calibration's coverage varies around it (``Beta``-distributed, sd
about ``sqrt(alpha (1 - alpha) / n)``: 0.03 at 100 rows per group), so a small site's sets may
cover less than ``1 - alpha`` for as long as they are deployed. ``confidence=c`` picks a higher
order statistic so that coverage is at least ``1 - alpha`` with probability ``c`` over the
calibration rows (Vovk, ACML 2012): per-deployment validity, paid for in set size. Either way
coverage is over the calibration distribution: it says nothing about one patient, nor about a
site whose data drift after calibration.
"""

from __future__ import annotations

__all__ = [
    "MONDRIAN",
    "SCORES",
    "TEMPERATURE_BOUNDS",
    "ConformalSets",
    "apply_temperature",
    "aps_scores",
    "conformal_quantile",
    "fit_conformal",
    "fit_temperature",
    "log_loss",
    "min_calibration_rows",
]

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.stats import binom

from medcl.errors import ConfigError, DataError
from medcl.metrics.calibration import check_predictions

#: How thresholds are grouped: one for all, per site (experience), per class, per both.
MONDRIAN = ("none", "site", "class", "site_class")
#: Non-conformity scores, and how records name them.
SCORES = ("lac", "aps")
SCORE_NAMES = {
    "lac": "LAC score 1 - p (Sadinle et al., JASA 2019)",
    "aps": "APS score (Romano et al., NeurIPS 2020)",
}
_LOG_FLOOR = -700.0  # log of a probability that underflowed to 0 (float32 softmax)
#: The search interval of :func:`fit_temperature`.
TEMPERATURE_BOUNDS = (0.02, 50.0)


def _log_probs(y_prob: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(y_prob), _LOG_FLOOR)


def apply_temperature(y_prob: ArrayLike, temperature: float | ArrayLike) -> NDArray[np.float64]:
    """``softmax(log p / T)``: probabilities ``(N, K)`` rescaled by ``T > 0``, one number or
    ``(K,)`` (each row takes its top class's: the arg-max never changes)."""
    t = np.asarray(temperature, dtype=np.float64)
    t = t.reshape(()) if t.size == 1 else t
    if t.ndim > 1 or not (np.isfinite(t).all() and (t > 0).all()) or t.size == 0:
        raise ConfigError(f"temperature must be finite numbers > 0; got {temperature!r}.")
    yp = np.asarray(y_prob, dtype=np.float64)
    row_t = t[yp.argmax(1)][:, None] if t.ndim == 1 else t
    return np.exp(log_softmax(_log_probs(yp) / row_t, axis=1))


def log_loss(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean negative log-likelihood of the labels (natural log; probabilities floored at e^-700)."""
    yt, yp = check_predictions(y_true, y_prob)
    return float(-_log_probs(yp)[np.arange(len(yt)), yt].mean())


def fit_temperature(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(log p / T)``.

    The NLL is convex in ``1 / T``; it is minimised on ``T`` in [0.02, 50] (bounded Brent).

    Args:
        y_true: ``(N,)`` class ids of held-out data (never the test split).
        y_prob: ``(N, K)`` probabilities of the model on the same rows.

    Returns:
        ``T`` (> 1 softens over-confident probabilities, < 1 sharpens).
    """
    yt, yp = check_predictions(y_true, y_prob)
    logp = _log_probs(yp)
    rows = np.arange(len(yt))

    def nll(inv_t: float) -> float:
        return float(-log_softmax(logp * inv_t, axis=1)[rows, yt].mean())

    lo, hi = 1.0 / TEMPERATURE_BOUNDS[1], 1.0 / TEMPERATURE_BOUNDS[0]
    best = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(1.0 / best.x)


def _ranked_mass(y_prob: NDArray[np.float64]) -> NDArray[np.float64]:
    """``(N, K)``: per class, the mass of the classes ranked at or above it (rank: decreasing
    probability, ties by class id)."""
    order = np.argsort(-y_prob, axis=1, kind="stable")  # (N, K)
    sorted_p = np.take_along_axis(y_prob, order, axis=1)
    through_sorted = np.cumsum(sorted_p, axis=1)
    through = np.empty_like(through_sorted)
    np.put_along_axis(through, order, through_sorted, axis=1)
    return through


def aps_scores(y_true: ArrayLike, y_prob: ArrayLike) -> NDArray[np.float64]:
    """``(N,)`` APS conformity scores: the mass of the classes ranked at or above the label."""
    yt, yp = check_predictions(y_true, y_prob)
    through = _ranked_mass(yp)
    return through[np.arange(len(yt)), yt]


def conformal_quantile(scores: ArrayLike, alpha: float, confidence: float | None = None) -> float:
    """The split-conformal threshold: the ``k``-th smallest of ``n`` calibration scores.

    Marginal (``confidence=None``): ``k = ceil((n + 1)(1 - alpha))``, so coverage is at least
    ``1 - alpha`` on average over calibration sets. Training-conditional (``confidence=c``): the
    smallest ``k`` with ``P(Binomial(n, 1 - alpha) >= k) <= 1 - c``. The coverage of the ``k``-th
    smallest score is ``Beta(k, n + 1 - k)``-distributed (Vovk, "Conditional validity of
    inductive conformal predictors", ACML 2012, prop. 2a; Angelopoulos and Bates 2021, sec. 3.2),
    whose CDF at ``1 - alpha`` is that binomial tail, so the sets of *this* calibration cover at
    least ``1 - alpha`` with probability ``>= c``.

    ``inf`` (every class in every set) when no ``k <= n`` qualifies: too few calibration examples
    for a finite threshold (marginal: ``n < 1 / alpha - 1``; at ``c = 0.9, alpha = 0.1``: n < 22).
    """
    _check_alpha(alpha)
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if confidence is None:
        k = math.ceil((n + 1) * (1.0 - alpha))
    else:
        _check_confidence(confidence)
        ks = np.arange(1, n + 1)
        ok = np.flatnonzero(binom.sf(ks - 1, n, 1.0 - alpha) <= 1.0 - confidence)
        k = int(ks[ok[0]]) if len(ok) else n + 1
    return float(s[k - 1]) if 1 <= k <= n else math.inf


def min_calibration_rows(alpha: float, confidence: float | None = None) -> int:
    """The fewest calibration rows for which :func:`conformal_quantile` is finite: ``k <= n``,
    i.e. ``n >= 1 / alpha - 1`` (marginal) or ``(1 - alpha)^n <= 1 - c`` (``k = n`` qualifies)."""
    _check_alpha(alpha)
    if confidence is None:
        return math.ceil(round(1 / alpha - 1, 9))
    _check_confidence(confidence)
    return math.ceil(round(math.log(1 - confidence) / math.log(1 - alpha), 9))


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and 0.0 < alpha < 1.0):
        raise ConfigError(f"alpha must lie in (0, 1), e.g. 0.1 for 90% coverage; got {alpha!r}.")


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, int | float) and 0.0 < confidence < 1.0):
        raise ConfigError(
            f"confidence must lie in (0, 1), e.g. 0.9 for sets that cover 1 - alpha with "
            f"probability 0.9 over the calibration rows, or None for marginal coverage; got "
            f"{confidence!r}."
        )


def _scores(y_prob: NDArray[np.float64], score: str) -> NDArray[np.float64]:
    """``(N, K)`` non-conformity score of every class for every row."""
    if score == "lac":
        return 1.0 - y_prob
    if score == "aps":
        return _ranked_mass(y_prob)
    raise ConfigError(f"score must be one of {list(SCORES)}; got {score!r}.")


_POOLED = "*"  # the group key when thresholds do not depend on the site
_TIE = 1e-9  # scores equal up to rounding (APS masses summing to 1) count as equal


@dataclass
class ConformalSets:
    """Fitted conformal thresholds; :meth:`sets` turns probabilities into prediction sets.

    Attributes:
        alpha: miscoverage: sets hold the label with probability ``>= 1 - alpha``.
        mondrian: ``"none"``, ``"site"``, ``"class"`` or ``"site_class"`` (module docstring).
        score: ``"lac"`` or ``"aps"``.
        n: calibration rows.
        groups: site name (``"*"`` when the thresholds do not depend on the site) ->
            ``(qhat (K,), n (K,))``: the threshold of each class and the calibration rows it
            rests on (the same threshold for every class unless ``mondrian`` is per class).
        qhat: the marginal threshold (all rows pooled), reported for comparison.
        confidence: ``None`` (marginal coverage) or the probability over calibration sets that
            coverage is at least ``1 - alpha`` (training-conditional thresholds).
    """

    alpha: float
    mondrian: str
    score: str
    n: int
    groups: dict[str, tuple[NDArray[np.float64], NDArray[np.int64]]] = field(default_factory=dict)
    qhat: float = math.inf
    confidence: float | None = None

    @property
    def by_site(self) -> bool:
        return self.mondrian in ("site", "site_class")

    @property
    def sites(self) -> list[str]:
        """The calibrated sites (empty when the thresholds do not depend on the site)."""
        return list(self.groups) if self.by_site else []

    def thresholds(self, site: str | None = None) -> NDArray[np.float64]:
        """``(K,)`` threshold of each class for an input of ``site`` (``None``: site unknown,
        the largest over sites).

        Raises:
            DataError: ``site`` was not calibrated (per-site thresholds only).
        """
        if not self.by_site:
            return self.groups[_POOLED][0]
        if site is None:
            return np.max(np.stack([q for q, _ in self.groups.values()]), axis=0)
        if site not in self.groups:
            raise DataError(
                f"site {site!r} has no conformal calibration; known sites: "
                f"{sorted(self.groups)}. Omit the site to use the thresholds that cover every "
                "known site."
            )
        return self.groups[site][0]

    def sets(
        self, y_prob: ArrayLike, sites: Sequence[str | None] | None = None
    ) -> NDArray[np.bool_]:
        """``(N, K)`` bool prediction sets for probabilities ``(N, K)``.

        Args:
            y_prob: calibrated probabilities (the same temperature as at calibration).
            sites: each row's site (per-site thresholds), or ``None`` for unknown sites.
        """
        yp = np.asarray(y_prob, dtype=np.float64)
        k = len(next(iter(self.groups.values()))[0])
        if yp.ndim != 2 or yp.shape[1] != k:
            raise DataError(
                f"the conformal thresholds cover {k} classes; got probabilities of shape "
                f"{yp.shape}. Recalibrate after an update that added classes."
            )
        if sites is None:
            q = self.thresholds()[None, :]  # (1, K)
        else:
            known = {s: self.thresholds(s) for s in dict.fromkeys(sites)}
            q = np.stack([known[s] for s in sites])  # (N, K)
        top = np.zeros(yp.shape, dtype=bool)
        top[np.arange(len(yp)), yp.argmax(1)] = True
        return (_scores(yp, self.score) <= q + _TIE) | top

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (an infinite threshold as ``null``: too few rows, or none)."""

        def num(q: float) -> float | None:
            return float(q) if math.isfinite(q) else None

        return {
            "method": f"split conformal, {SCORE_NAMES[self.score]}, deterministic"
            + ("" if self.confidence is None else f", training-conditional at {self.confidence:g}"),
            "score": self.score,
            "alpha": self.alpha,
            "mondrian": self.mondrian,
            "confidence": self.confidence,
            "n": self.n,
            "qhat": num(self.qhat),
            "groups": [
                {"site": g, "qhat": [num(x) for x in q], "n": [int(x) for x in n]}
                for g, (q, n) in self.groups.items()
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalSets:
        def arr(xs: list[float | None], ns: list[int]) -> NDArray[np.float64]:
            # null: +inf (too few rows), or -inf for a class without rows (never calibrated)
            return np.asarray(
                [
                    (-math.inf if n == 0 else math.inf) if x is None else float(x)
                    for x, n in zip(xs, ns, strict=True)
                ]
            )

        return cls(
            alpha=float(d["alpha"]),
            mondrian=str(d["mondrian"]),
            score=str(d["score"]),
            n=int(d["n"]),
            groups={
                str(g["site"]): (arr(g["qhat"], g["n"]), np.asarray(g["n"], dtype=np.int64))
                for g in d["groups"]
            },
            qhat=math.inf if d.get("qhat") is None else float(d["qhat"]),
            confidence=None if d.get("confidence") is None else float(d["confidence"]),
        )


def fit_conformal(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    *,
    alpha: float = 0.1,
    mondrian: str = "site_class",
    score: str = "lac",
    sites: Sequence[str] | None = None,
    confidence: float | None = None,
) -> ConformalSets:
    """Calibrate conformal thresholds on held-out rows (never the test split).

    Args:
        y_true: ``(N,)`` class ids.
        y_prob: ``(N, K)`` probabilities, after the temperature that prediction will use.
        alpha: miscoverage in (0, 1).
        mondrian: ``"none"``, ``"site"``, ``"class"`` or ``"site_class"`` (the site ones need
            ``sites``).
        score: ``"lac"`` or ``"aps"`` (see the module docstring).
        sites: ``N`` site names (the experience each row comes from).
        confidence: ``None`` for marginal thresholds, or ``c`` in (0, 1) for thresholds whose
            coverage is at least ``1 - alpha`` with probability ``c`` over the calibration rows
            (:func:`conformal_quantile`; larger sets, infinite below 22 rows per group at 0.9).
    """
    _check_alpha(alpha)
    if confidence is not None:
        _check_confidence(confidence)
    if mondrian not in MONDRIAN:
        raise ConfigError(f"mondrian must be one of {list(MONDRIAN)}; got {mondrian!r}.")
    yt, yp = check_predictions(y_true, y_prob)
    s, k = _scores(yp, score)[np.arange(len(yt)), yt], yp.shape[1]  # (N,) score at the label
    by_site = mondrian in ("site", "site_class")
    if by_site and sites is None:
        raise ConfigError(
            f"mondrian={mondrian!r} needs the site of every calibration row (sites=...)."
        )
    names = np.asarray([str(x) for x in sites] if by_site else [_POOLED] * len(yt), dtype=object)
    if len(names) != len(yt):
        raise DataError(f"sites has {len(names)} entries for {len(yt)} rows.")
    groups = {}
    for g in dict.fromkeys(names.tolist()):
        m = names == g
        if mondrian in ("class", "site_class"):
            n = [int((m & (yt == c)).sum()) for c in range(k)]
            q = [
                conformal_quantile(s[m & (yt == c)], alpha, confidence) if n[c] else -math.inf
                for c in range(k)
            ]
        else:
            q, n = [conformal_quantile(s[m], alpha, confidence)] * k, [int(m.sum())] * k
        groups[g] = (np.asarray(q, dtype=np.float64), np.asarray(n, dtype=np.int64))
    qhat = conformal_quantile(s, alpha, confidence)
    return ConformalSets(alpha, mondrian, score, len(yt), groups, qhat, confidence)
