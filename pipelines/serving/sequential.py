"""Anytime-valid sequential tests for the canary: evidence accumulates over every window and
weight step of one analysis, so it may be looked at after each window without inflating the
false-rollback rate (Lindon et al., KDD 2022; Waudby-Smith & Ramdas, JRSS-B 2023).

Each comparison keeps a small JSON state (plain numbers and lists) that :func:`update` folds one
window into; :func:`findings` reads the decisions back with their statistic, boundary and the
requests used. Rollback tests share ``alpha`` (Bonferroni: errors, latency, scores a third each,
scores split over its two sides), so P(any false rollback) <= alpha however often one looks.
Promotion needs every metric shown within its margin (an intersection-union test: each promote
test may run at the full ``promote_alpha``; the errors test spends half of it, see below).

- Errors, worse: conditional on each time bucket's traffic and error count, the canary's share
  of the errors is hypergeometric when the rates are equal; a mixture SPRT over a grid of odds
  ratios (Fisher's noncentral hypergeometric likelihood) is a test martingale under H0.
- Errors, within margin: a sequential likelihood-ratio test of H0: canary rate >= stable rate +
  ``error_margin``. Each canary request multiplies the e-value by the Bernoulli likelihood ratio
  of a predictable alternative (the canary's running rate, shrunk towards stable's) against
  q = stable's time-uniform lower bound + margin; under H0 the canary's rate is >= q whenever the
  stable bound holds, and the ratio then has expectation <= 1 (monotone likelihood ratio), so
  P(within shown | H0) <= the canary's share of ``promote_alpha`` plus the stable bound's share
  (a Beta-binomial mixture confidence sequence, Robbins 1970), half of ``promote_alpha`` in all.
  It needs far fewer requests than comparing a confidence bound on each rate.
- Latency: each canary request against the baseline requests of its time bucket (a slowdown that
  hits both pools cancels in the log ratio), clipped log ratios, betting e-processes (aGRAPA) for
  "slower than baseline" and "not slower than 1 + latency_margin". The same "slower" test also
  runs for each canary replica (against the baseline pool) and for each baseline replica
  (against the canary pool), and latency is shown worse only when the pooled test *and* every
  one of those with ``replica_min_pairs`` matched requests have crossed the boundary. A slower
  version is slower on every replica; a process that runs slow (or fast) for a while, from CPU
  contention on a shared node, is one replica, and must not decide about a version. Requiring
  more than the pooled test can only lower the false-rollback rate. A replica counts while it
  has answered in the last ``RECENT_WINDOWS`` windows (a replaced pod comes back under another
  address). The budget rule stays on the pooled estimate: without conclusive evidence a slower
  pool is the safe side to roll back.
- Scores: P(canary score > stable score), each canary answer against its share of the window's
  stable answers, betting e-processes for "outside expected +- score_margin" (rollback) and
  "inside" (promote). The expected value is what evaluation measured for the pair on the
  held-out rows (``pipelines/evaluate/expected.py``: ``p_superiority``; 1/2 for two copies of
  one model), so a retrained model whose scores moved as evaluated is not taken for a drifted
  one; on live traffic unlike the held-out rows the margin absorbs the difference.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special

from pipelines.config import CanarySettings
from pipelines.serving.dataplane.evidence import Sample

ODDS_GRID = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
# Latency log ratios are clipped to +-1 (a factor of e) so each observation is bounded, which is
# all the betting test needs; a +20 % canary reads 0.18, far inside the clip.
LOG_CLIP = 1.0
# The "errors within margin" test spends half of promote_alpha: 0.4 on the canary's
# likelihood-ratio test, 0.1 on the stable rate's lower bound (the stable side has about 19
# requests per canary request at the hold weight). Not all of it: a canary at exactly the margin
# (the bench's +2 points) promotes early at most that often, and with all of promote_alpha that
# cost 1.3 points of power against it (bench/canary_power.py, 800 seeds: 0.937 against 0.9475).
WITHIN_CANARY_SHARE = 0.4
WITHIN_STABLE_SHARE = 0.1
# Pseudo-requests at stable's rate in the within test's alternative: the canary's own running
# rate takes over as its requests outnumber them.
WITHIN_PRIOR_N = 50.0
# A bet never risks more than this share of what one observation could lose (Waudby-Smith and
# Ramdas truncate at 1/2): a full bet is ruined by one unlucky observation.
BET_CAP = 0.5

State = dict[str, Any]


def _bet() -> State:
    return {"n": 0, "mean": 0.0, "m2": 0.0, "log_e": 0.0, "max_log_e": 0.0, "rejected_at": None}


def new_state(score_center: float = 0.5, source: str = "one model") -> State:
    """The evidence of an analysis before its first window; ``score_center``: the expected
    P(canary score > stable score) (evaluation's; 1/2 for one model against itself), and where
    it comes from."""
    return {
        "canary_requests": 0,
        "stable_requests": 0,
        "errors": {
            "canary_n": 0,
            "canary_errors": 0,
            "stable_n": 0,
            "stable_errors": 0,
            "log_lr": [0.0] * len(ODDS_GRID),
            "worse_at": None,
            "within_at": None,
            "within_log_e": 0.0,
            "within_max_log_e": 0.0,
        },
        "latency": {
            "pairs": 0,
            "log_ratio_sum": 0.0,
            "worse": _bet(),
            "within": _bet(),
            "replicas": {},  # "canary <replica>" / "baseline <replica>" -> pairs, sum, worse
        },
        "scores": {
            "center": float(score_center),
            "center_source": source,
            "pairs": 0,
            "seen": [],
            "above": _bet(),
            "below": _bet(),
            "within_above": _bet(),
            "within_below": _bet(),
        },
    }


def _bet_on(b: State, xs: np.ndarray, null: float, side: int, lo: float, hi: float) -> None:
    """Fold observations ``xs`` (in ``[lo, hi]``, in time order) into a test of H0: mean <= null
    (``side`` +1) or mean >= null (``side`` -1). The capital prod(1 + lam (x - null) side) is a
    nonnegative supermartingale under H0 whenever lam >= 0 is chosen from past data only, so by
    Ville's inequality it crosses ``1/level`` with probability <= level. lam is the aGRAPA plug-in
    (Waudby-Smith & Ramdas 2023), shrunk towards the null so nothing is bet before evidence."""
    loss = (null - lo) if side > 0 else (hi - null)
    cap = BET_CAP / loss
    prior_var = ((hi - lo) / 4.0) ** 2
    n, mean, m2, log_e, best = b["n"], b["mean"], b["m2"], b["log_e"], b["max_log_e"]
    for x in xs.tolist():
        mu = (null + n * mean) / (n + 1)
        var = (prior_var + m2) / (n + 1)
        edge = side * (mu - null)
        lam = min(max(edge / (var + edge * edge), 0.0), cap)
        log_e += math.log1p(lam * side * (x - null))
        best = max(best, log_e)
        n += 1
        d = x - mean
        mean += d / n
        m2 += d * (x - mean)
    b.update(n=n, mean=mean, m2=m2, log_e=log_e, max_log_e=best)


def _mark(b: State, log_bound: float, requests: int) -> None:
    if b["rejected_at"] is None and b["max_log_e"] >= log_bound:
        b["rejected_at"] = requests


def partners(c_times: np.ndarray, r_times: np.ndarray, bucket_s: float) -> list[np.ndarray]:
    """For each canary request, the reference requests of its time bucket it is compared with,
    dealt out in time order so no reference serves two canary requests (the observations stay
    independent); a canary request alone in its bucket gets none."""
    out: list[np.ndarray] = [np.empty(0, dtype=int) for _ in range(len(c_times))]
    if not len(c_times) or not len(r_times):
        return out
    cb = np.floor(c_times / bucket_s).astype(np.int64)  # bucket_s = inf: one bucket
    rb = np.floor(r_times / bucket_s).astype(np.int64)
    r_order = np.lexsort((r_times, rb))
    r_sorted_b = rb[r_order]
    for b in np.unique(cb):
        cs = np.flatnonzero(cb == b)
        cs = cs[np.argsort(c_times[cs], kind="stable")]
        lo, hi = np.searchsorted(r_sorted_b, [b, b + 1])
        rs = r_order[lo:hi]
        if not len(rs):
            continue
        # The j-th reference (in time) goes to the canary request at the same relative place.
        owner = (np.arange(len(rs)) * len(cs)) // len(rs)
        for k, i in enumerate(cs):
            out[i] = rs[owner == k]
    return out


def _logcomb(n: int, k: np.ndarray) -> np.ndarray:
    return np.asarray(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1))


def fisher_log_lr(x: int, nc: int, ns: int, e: int) -> np.ndarray:
    """log LR of odds ratios ``ODDS_GRID`` against 1 for ``x`` canary errors among ``e``, given
    ``nc`` canary and ``ns`` stable requests (Fisher's noncentral hypergeometric)."""
    k = np.arange(max(0, e - ns), min(e, nc) + 1)
    logw = _logcomb(nc, k) + _logcomb(ns, e - k)
    log_theta = np.log(np.asarray(ODDS_GRID))
    alt = special.logsumexp(logw[None, :] + np.outer(log_theta, k), axis=1)
    return np.asarray(x * log_theta - alt + special.logsumexp(logw))


def rate_bounds(k: int, n: int, level: float, prior_b: float) -> tuple[float, float]:
    """Time-uniform (1 - level) bounds on a Bernoulli rate from ``k`` of ``n``: the rates p whose
    Beta(1, prior_b)-mixture martingale has not reached 1/level (Robbins 1970)."""
    if n == 0:
        return 0.0, 1.0
    c = float(special.betaln(1.0 + k, prior_b + n - k) - special.betaln(1.0, prior_b))
    thr = math.log(1.0 / level)

    def f(p: float) -> float:
        # (n - k) log(1 - p) is 0 when every request failed (no log1p(-1) at p = 1).
        fails = (n - k) * math.log1p(-p) if n > k else 0.0
        return c - k * math.log(p) - fails - thr

    phat, top, tiny = k / n, 1.0 - 1e-12, 1e-300
    hi = 1.0 if k == n or f(top) <= 0 else float(optimize.brentq(f, max(phat, 1e-12), top))
    lo = 0.0 if k == 0 else float(optimize.brentq(f, tiny, min(phat, top)))
    return lo, hi


def _ok(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.code == 200]


def _score(s: Sample) -> float:
    return s.scores[0] if s.scores and math.isfinite(s.scores[0]) else math.nan


def _update_errors(
    st: State, canary: list[Sample], stable: list[Sample], cfg: CanarySettings
) -> None:
    ct = np.array([s.t for s in canary], dtype=float)
    ce = np.array([s.code != 200 for s in canary], dtype=bool)
    rt = np.array([s.t for s in stable], dtype=float)
    re = np.array([s.code != 200 for s in stable], dtype=bool)
    st["stable_n"] += len(stable)
    st["stable_errors"] += int(re.sum())
    _update_within(st, ce, cfg)
    st["canary_n"] += len(canary)
    st["canary_errors"] += int(ce.sum())
    cb = np.floor(ct / cfg.bucket_seconds).astype(np.int64)
    rb = np.floor(rt / cfg.bucket_seconds).astype(np.int64)
    llr = np.asarray(st["log_lr"], dtype=float)
    # Only buckets with errors and both pools carry information; the others' LR is exactly 1.
    for b in np.unique(np.concatenate([cb[ce], rb[re]])):
        nc, ns = int(np.sum(cb == b)), int(np.sum(rb == b))
        x, y = int(np.sum(ce & (cb == b))), int(np.sum(re & (rb == b)))
        if nc and ns:
            llr += fisher_log_lr(x, nc, ns, x + y)
    st["log_lr"] = [float(v) for v in llr]


def within_null(st: State, cfg: CanarySettings) -> float:
    """q: the canary error rate the within test tests against, stable's time-uniform lower
    bound (at ``WITHIN_STABLE_SHARE`` of ``promote_alpha``) plus the margin."""
    level = cfg.promote_alpha * WITHIN_STABLE_SHARE
    s_lo, _ = rate_bounds(st["stable_errors"], st["stable_n"], level, 1.0 / cfg.error_margin)
    return min(s_lo + cfg.error_margin, 1.0 - 1e-9)


def _update_within(st: State, ce: np.ndarray, cfg: CanarySettings) -> None:
    """Fold a window's canary outcomes into the within test's e-value. The canary's and
    stable's requests are different requests, so given the stable outcomes (this window's
    included) the canary's are still Bernoulli at its rate: q and the alternative may use them,
    and the alternative uses only the canary requests before each one."""
    if not len(ce):
        return
    q = within_null(st, cfg)
    s_rate = (st["stable_errors"] + 0.5) / (st["stable_n"] + 1.0)
    k, n = st["canary_errors"], st["canary_n"]
    log_e, best = st.get("within_log_e", 0.0), st.get("within_max_log_e", 0.0)
    for x in ce.tolist():
        alt = (k + WITHIN_PRIOR_N * s_rate) / (n + WITHIN_PRIOR_N)
        alt = min(max(alt, 1e-6), 0.9 * q)
        log_e += math.log(alt / q) if x else math.log1p(-alt) - math.log1p(-q)
        best = max(best, log_e)
        k, n = k + int(x), n + 1
    st["within_log_e"], st["within_max_log_e"] = log_e, best


def within_bound_log(cfg: CanarySettings) -> float:
    """log boundary of the within test: 1 / (the canary's share of ``promote_alpha``)."""
    return math.log(1.0 / (cfg.promote_alpha * WITHIN_CANARY_SHARE))


def errors_e_value_log(st: State) -> float:
    """log of the mixture SPRT's e-value (uniform weights over the odds-ratio grid)."""
    return float(special.logsumexp(st["log_lr"]) - math.log(len(ODDS_GRID)))


def _log_ratios(c: list[Sample], r: list[Sample], cfg: CanarySettings) -> list[np.ndarray]:
    """Per canary request (in time order) that has partners in its time bucket: its log latency
    minus each partner's (:func:`partners`)."""
    if not c or not r:
        return []
    ct = np.array([s.t for s in c])
    clog = np.log(np.maximum([s.latency_ms for s in c], 1e-6))
    rlog = np.log(np.maximum([s.latency_ms for s in r], 1e-6))
    match = partners(ct, np.array([s.t for s in r]), cfg.bucket_seconds)
    return [clog[i] - rlog[match[i]] for i in np.argsort(ct, kind="stable") if len(match[i])]


def _update_latency(
    st: State, canary: list[Sample], baseline: list[Sample], cfg: CanarySettings
) -> None:
    c, r = _ok(canary), _ok(baseline)
    raw = _log_ratios(c, r, cfg)
    if not raw:
        return
    shift = math.log1p(cfg.latency_margin)
    worse = np.array([np.clip(d, -LOG_CLIP, LOG_CLIP).mean() for d in raw])
    within = np.array([np.clip(d - shift, -LOG_CLIP, LOG_CLIP).mean() for d in raw])
    st["pairs"] += len(raw)
    st["log_ratio_sum"] += float(sum(d.mean() for d in raw))
    _bet_on(st["worse"], worse, 0.0, +1, -LOG_CLIP, LOG_CLIP)
    _bet_on(st["within"], within, 0.0, -1, -LOG_CLIP, LOG_CLIP)
    st["windows"] = st.get("windows", 0) + 1
    _update_replica_pairs(st.setdefault("replicas", {}), c, r, cfg, st["windows"])


def _update_replica_pairs(
    groups: dict[str, State],
    canary: list[Sample],
    baseline: list[Sample],
    cfg: CanarySettings,
    window: int,
) -> None:
    """The "slower" test per replica: each canary replica's requests against the whole
    baseline pool, and the whole canary pool against each baseline replica's requests (time
    buckets as the pooled test). One slow canary process leaves the other canary replicas'
    tests quiet; one fast baseline process leaves the other baseline replicas' tests quiet."""
    sides = [
        (f"canary {r or '?'}", [s for s in canary if s.replica == r], baseline)
        for r in sorted({s.replica for s in canary})
    ]
    sides += [
        (f"baseline {r or '?'}", canary, [s for s in baseline if s.replica == r])
        for r in sorted({s.replica for s in baseline})
    ]
    for name, c, r in sides:
        raw = _log_ratios(c, r, cfg)
        if not raw:
            continue
        g = groups.setdefault(name, {"pairs": 0, "log_ratio_sum": 0.0, "worse": _bet()})
        g["last_window"] = window
        g["pairs"] += len(raw)
        g["log_ratio_sum"] += float(sum(d.mean() for d in raw))
        xs = np.array([np.clip(d, -LOG_CLIP, LOG_CLIP).mean() for d in raw])
        _bet_on(g["worse"], xs, 0.0, +1, -LOG_CLIP, LOG_CLIP)


RECENT_WINDOWS = 3
"""A replica counts while it answered in one of the analysis' last this many windows: a pod
that was replaced (a new address) stops holding the rule back."""


def _judged(st: State, cfg: CanarySettings) -> list[State]:
    latest = st.get("windows", 0)
    return [
        g
        for g in st.get("replicas", {}).values()
        if g["pairs"] >= cfg.replica_min_pairs
        and g.get("last_window", latest) > latest - RECENT_WINDOWS
    ]


def latency_worse(st: State, cfg: CanarySettings) -> bool:
    """The pooled test crossed, and so did every replica's with enough matched requests
    (none with enough: the pooled test alone decides)."""
    if st["worse"]["rejected_at"] is None:
        return False
    return all(g["worse"]["rejected_at"] is not None for g in _judged(st, cfg))


def _update_scores(
    st: State, canary: list[Sample], stable: list[Sample], cfg: CanarySettings
) -> None:
    # The local replay cycles a finite set of held-out rows, so a canary may answer the same row
    # more than once; a model answers one row with the same score bits, so a repeated score is
    # one observation of the score distribution, not many (two rows with exactly the same
    # float32 score are rare, and dropping one of them only costs evidence).
    seen = set(st["seen"])
    c = []
    for s in _ok(canary):
        v = _score(s)
        tag = zlib.crc32(repr(v).encode())
        if math.isfinite(v) and tag not in seen:
            seen.add(tag)
            c.append((s.t, v))
    st["seen"] = sorted(seen)
    r = [(s.t, _score(s)) for s in _ok(stable)]
    c = [x for x in c if math.isfinite(x[1])]
    r = [x for x in r if math.isfinite(x[1])]
    if not c or not r:
        return
    ct, cs = np.array([x[0] for x in c]), np.array([x[1] for x in c])
    rs = np.array([x[1] for x in r])
    # Scores depend on the row, not on the moment: the whole window is one bucket, so each
    # canary request gets every stable answer it can (at 5 % about 19).
    groups = partners(ct, np.array([x[0] for x in r]), math.inf)
    used = [i for i in np.argsort(ct, kind="stable") if len(groups[i])]
    if not used:
        return
    # Ties count a half, so E[u] = 1/2 exactly when both pools answer from one distribution.
    u = np.array([np.mean((cs[i] > rs[groups[i]]) + 0.5 * (cs[i] == rs[groups[i]])) for i in used])
    st["pairs"] += len(used)
    st["u_sum"] = st.get("u_sum", 0.0) + float(u.sum())
    hi, lo = score_band(st, cfg)
    if hi < 1 - EDGE:  # a side of the band at or past 0 or 1 cannot be crossed: not tested
        _bet_on(st["above"], u, hi, +1, 0.0, 1.0)
        _bet_on(st["within_above"], u, hi, -1, 0.0, 1.0)
    if lo > EDGE:
        _bet_on(st["below"], u, lo, -1, 0.0, 1.0)
        _bet_on(st["within_below"], u, lo, +1, 0.0, 1.0)


# A band edge this close to 0 or 1 (or past it) leaves no room to test that side.
EDGE = 1e-3


def score_band(st: State, cfg: CanarySettings) -> tuple[float, float]:
    """(upper, lower) edges of the score test's band: expected +- margin. An edge at or past 1
    (or 0) is a side on which the canary can be neither shown worse nor needs showing within."""
    c, m = st.get("center", 0.5), cfg.score_margin
    return c + m, c - m


def _bounds(cfg: CanarySettings) -> tuple[float, float]:
    """log boundaries: a rollback test's (alpha / 3 each) and a promote test's."""
    return math.log(3.0 / cfg.alpha), math.log(1.0 / cfg.promote_alpha)


def update(state: State, window: dict[str, list[Sample]], cfg: CanarySettings) -> State:
    """Fold one window (``{"canary", "stable", "baseline"}``) into the evidence; the input is
    unchanged. Latency compares with the baseline pool, errors and scores with every request the
    stable version answered (``stable + baseline``), as the windowed judge does."""
    out = copy.deepcopy(state)
    stable = window["stable"] + window["baseline"]
    out["canary_requests"] += len(window["canary"])
    out["stable_requests"] += len(stable)
    _update_errors(out["errors"], window["canary"], stable, cfg)
    _update_latency(out["latency"], window["canary"], window["baseline"], cfg)
    _update_scores(out["scores"], window["canary"], stable, cfg)
    n = out["canary_requests"]
    bound_w, bound_p = _bounds(cfg)
    err = out["errors"]
    if err["worse_at"] is None and errors_e_value_log(err) >= bound_w:
        err["worse_at"] = n
    if err["within_at"] is None and err.get("within_max_log_e", 0.0) >= within_bound_log(cfg):
        err["within_at"] = n
    _mark(out["latency"]["worse"], bound_w, n)
    _mark(out["latency"]["within"], bound_p, n)
    for g in out["latency"].get("replicas", {}).values():
        _mark(g["worse"], bound_w, n)
    for side in ("above", "below"):
        _mark(out["scores"][side], bound_w - math.log(2), n)
    for side in ("within_above", "within_below"):
        _mark(out["scores"][side], bound_p, n)
    return out


@dataclass(frozen=True)
class Finding:
    """One comparison's standing: shown worse (rollback), shown within margin (promote), and
    whether its point estimate is within the margin (the budget rule; None = not judged)."""

    name: str
    worse: bool
    within: bool
    estimate_ok: bool | None
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _e(log_e: float) -> str:
    return f"{math.exp(min(log_e, 700.0)):.3g}"


def findings(state: State, cfg: CanarySettings) -> list[Finding]:
    """The three comparisons as they stand, each explained: statistic, boundary, requests."""
    bound_w, bound_p = _bounds(cfg)
    err, lat, sc = state["errors"], state["latency"], state["scores"]
    out = []

    cn, sn = err["canary_n"], err["stable_n"]
    c_rate = err["canary_errors"] / cn if cn else math.nan
    s_rate = err["stable_errors"] / sn if sn else math.nan
    e_log = errors_e_value_log(err)
    e_in, bound_in, q = (
        err.get("within_max_log_e", 0.0),
        within_bound_log(cfg),
        within_null(err, cfg),
    )
    out.append(
        Finding(
            "errors_vs_stable",
            err["worse_at"] is not None,
            err["within_at"] is not None,
            None if not (cn and sn) else bool(c_rate - s_rate <= cfg.error_margin),
            f"canary {err['canary_errors']}/{cn} vs stable {err['stable_errors']}/{sn} errors; "
            f"worse: mixture SPRT e={_e(e_log)} (boundary {_e(bound_w)})"
            + (f" at {err['worse_at']} canary requests" if err["worse_at"] is not None else "")
            + f"; within {cfg.error_margin:.1%}: SPRT against canary rate {q:.2%} now (stable's "
            f"lower bound + margin) e={_e(e_in)} (boundary {_e(bound_in)})"
            + (f", shown at {err['within_at']}" if err["within_at"] is not None else ""),
            {
                "canary_rate": c_rate,
                "stable_rate": s_rate,
                "e_worse": math.exp(min(e_log, 700.0)),
                "boundary_worse": math.exp(bound_w),
                "e_within": math.exp(min(e_in, 700.0)),
                "boundary_within": math.exp(bound_in),
                "within_null": q,
                "margin": cfg.error_margin,
                "requests": cn,
            },
        )
    )

    pairs = lat["pairs"]
    ratio = math.exp(lat["log_ratio_sum"] / pairs) if pairs else math.nan
    replicas = {
        name: {
            "pairs": g["pairs"],
            "ratio": math.exp(g["log_ratio_sum"] / g["pairs"]) if g["pairs"] else math.nan,
            "e_worse": math.exp(min(g["worse"]["max_log_e"], 700.0)),
            "shown_at": g["worse"]["rejected_at"],
        }
        for name, g in sorted(lat.get("replicas", {}).items())
    }
    per_replica = "; per replica (slower shown by every one with >= "
    per_replica += f"{cfg.replica_min_pairs} requests): " + ", ".join(
        f"{name} ratio {r['ratio']:.3f} e={_e(math.log(max(r['e_worse'], 1e-300)))} "
        f"over {r['pairs']}" + (" shown" if r["shown_at"] is not None else "")
        for name, r in replicas.items()
    )
    out.append(
        Finding(
            "latency_vs_stable",
            latency_worse(lat, cfg),
            lat["within"]["rejected_at"] is not None,
            None if not pairs else bool(ratio <= 1 + cfg.latency_margin),
            f"ratio {ratio:.3f} vs baseline over {pairs} canary requests matched in "
            f"{cfg.bucket_seconds:g} s buckets; slower: e={_e(lat['worse']['max_log_e'])} "
            f"(boundary {_e(bound_w)})"
            + _at(lat["worse"])
            + f"; within x{1 + cfg.latency_margin:.2f}: e={_e(lat['within']['max_log_e'])} "
            f"(boundary {_e(bound_p)})" + _at(lat["within"]) + (per_replica if replicas else ""),
            {
                "ratio": ratio,
                "e_worse": math.exp(min(lat["worse"]["max_log_e"], 700.0)),
                "boundary_worse": math.exp(bound_w),
                "e_within": math.exp(min(lat["within"]["max_log_e"], 700.0)),
                "boundary_within": math.exp(bound_p),
                "margin": cfg.latency_margin,
                "requests": pairs,
                "replicas": replicas,
            },
        )
    )

    pairs = sc["pairs"]
    # The running mean of u (an older state kept it only in the "above" bet).
    theta = sc.get("u_sum", sc["above"]["mean"] * pairs) / pairs if pairs else math.nan
    center = sc.get("center", 0.5)
    hi, lo = score_band(sc, cfg)
    tested = [k for k, open_side in (("above", hi < 1 - EDGE), ("below", lo > EDGE)) if open_side]
    bound_s = bound_w - math.log(2)
    e_out = max((sc[k]["max_log_e"] for k in tested), default=0.0)
    e_in = min((sc[f"within_{k}"]["max_log_e"] for k in tested), default=0.0)
    rejected = [sc[k]["rejected_at"] for k in tested]
    shown = [sc[f"within_{k}"]["rejected_at"] for k in tested]
    out.append(
        Finding(
            "score_drift",
            any(r is not None for r in rejected),
            all(r is not None for r in shown),
            None if not pairs else bool(lo <= theta <= hi),
            f"P(canary score > stable) {theta:.3f} over {pairs} canary requests, expected "
            f"{center:.3f} ({sc.get('center_source', 'one model')}); outside "
            f"{center:.3f} +- {cfg.score_margin:g}: e={_e(e_out)} (boundary {_e(bound_s)})"
            + "".join(_at(sc[k]) for k in tested)
            + f"; within: e={_e(e_in)} (boundary {_e(bound_p)})"
            + (f", shown at {max(shown)}" if shown and all(r is not None for r in shown) else "")
            + (
                ""
                if len(tested) == 2
                else f" (the band reaches {'1' if hi >= 1 - EDGE else '0'}: that side untested)"
            ),
            {
                "p_superiority": theta,
                "expected": center,
                "e_worse": math.exp(min(e_out, 700.0)),
                "boundary_worse": math.exp(bound_s),
                "e_within": math.exp(min(e_in, 700.0)),
                "boundary_within": math.exp(bound_p),
                "margin": cfg.score_margin,
                "requests": pairs,
            },
        )
    )
    return out


def _at(b: State) -> str:
    return f", shown at {b['rejected_at']} canary requests" if b["rejected_at"] is not None else ""
