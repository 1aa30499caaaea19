"""Small numerical fits, by hand (no scipy): relative-error least squares for models linear in
their coefficients, and a golden-section search for one coefficient at a time.

Every fit minimises *relative* error: a 1 KiB message and a 256 MiB one should count the same,
as should a 10 MFLOP and a 100 GFLOP matrix multiply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence


def lstsq_relative(rows: Sequence[Sequence[float]], t: Sequence[float], *,
                   nonneg: bool = True) -> list[float]:
    """Coefficients c minimising sum_i ((rows[i] . c - t_i) / t_i)^2, optionally with c >= 0.

    Solved through the normal equations (the systems here have 2-3 unknowns); with ``nonneg`` a
    negative coefficient is clamped to zero and the rest refitted (exact active-set for 2-3
    unknowns, which is all we use)."""
    n = len(rows[0])
    active = list(range(n))
    while True:
        a = [[r[j] / ti for j in active] for r, ti in zip(rows, t)]
        c = _solve_normal(a, [1.0] * len(t))
        neg = [j for j, v in zip(active, c) if v < 0]
        if not nonneg or not neg:
            break
        active.remove(min(neg, key=lambda j: c[active.index(j)]))
        if not active:
            return [0.0] * n
    full = [0.0] * n
    for j, v in zip(active, c):
        full[j] = v
    return full


def _solve_normal(a: list[list[float]], y: list[float]) -> list[float]:
    n = len(a[0])
    ata = [[sum(r[i] * r[j] for r in a) for j in range(n)] for i in range(n)]
    aty = [sum(r[i] * yi for r, yi in zip(a, y)) for i in range(n)]
    # Gaussian elimination with partial pivoting; tiny ridge keeps a rank-deficient system finite.
    for i in range(n):
        ata[i][i] += 1e-12 * (ata[i][i] or 1.0)
    m = [row + [v] for row, v in zip(ata, aty)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[col][col]:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if m[i][i] else 0.0 for i in range(n)]


def rms_relative_error(pred: Sequence[float], meas: Sequence[float]) -> float:
    return math.sqrt(sum(((p - m) / m) ** 2 for p, m in zip(pred, meas)) / len(meas))


# ---- compute: eta(F) = max_fraction * F / (F + F_half) -------------------------------------

@dataclass
class ComputeFit:
    max_fraction: float
    half_saturation_gflop: float
    min_dim_saturation: int
    rms_error: float  # relative, over the points fitted
    points: int


def _fit_curve(flops, time_s, peak_flops, narrow) -> tuple[float, float, float]:
    rows = [[f / (p * c), 1.0 / (p * c)] for f, p, c in zip(flops, peak_flops, narrow)]
    inv_mf, fh_over_mf = lstsq_relative(rows, time_s)
    if inv_mf <= 0:
        raise ValueError("compute fit failed: time does not grow with FLOPs")
    mf, fh = 1.0 / inv_mf, fh_over_mf / inv_mf
    pred = [(f + fh) / (p * mf * c) for f, p, c in zip(flops, peak_flops, narrow)]
    return mf, fh, rms_relative_error(pred, time_s)


def fit_compute(flops: Sequence[float], time_s: Sequence[float], peak_flops: Sequence[float],
                min_dims: Sequence[float] | None = None) -> ComputeFit:
    """Fit the cost model's efficiency curve (kdplan.cost.compute.matmul_efficiency) to measured
    matrix multiplies: eta = mf * F / (F + Fh) * min(1, min_dim / D).

    For a fixed D the time F / (P * eta) = (F + Fh) / (P * mf * c) with c = min(1, min_dim / D) is
    linear in (1/mf, Fh/mf), so that part is exact least squares; D (an integer) is searched over
    powers of two and refined by golden section in log space."""
    if min_dims is None:
        mf, fh, rms = _fit_curve(flops, time_s, peak_flops, [1.0] * len(flops))
        return ComputeFit(min(1.0, mf), fh / 1e9, 1, rms, len(flops))

    def rms_at(log_d: float) -> float:
        d = math.exp(log_d)
        return _fit_curve(flops, time_s, peak_flops, [min(1.0, m / d) for m in min_dims])[2]

    grid = [math.log(2.0**i) for i in range(13)]
    i = min(range(len(grid)), key=lambda j: rms_at(grid[j]))
    log_d, _ = golden_section(rms_at, grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)], iters=20)
    d = max(1, round(math.exp(log_d)))
    mf, fh, rms = _fit_curve(flops, time_s, peak_flops, [min(1.0, m / d) for m in min_dims])
    return ComputeFit(min(1.0, mf), fh / 1e9, d, rms, len(flops))


# ---- links: ring collectives, T = hops * alpha + volume / B (formulas.md section 3) ----------

def ring_terms(op: str, nranks: int, size_bytes: float) -> tuple[float, float]:
    """(latency hops, bytes each rank sends) of one ring collective on a buffer of size_bytes."""
    k = nranks
    if op == "all_reduce":
        return 2.0 * (k - 1), 2.0 * (k - 1) / k * size_bytes
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(k - 1), (k - 1) / k * size_bytes
    if op in ("send_recv", "p2p", "copy"):
        return 1.0, float(size_bytes)
    raise ValueError(f"unknown collective {op!r}")


@dataclass
class LinkFit:
    latency_us: float
    bandwidth_gb_per_s: float  # achieved (effective) bandwidth per rank
    rms_error: float
    points: int


def fit_link(samples: Sequence[dict]) -> LinkFit:
    """Per-hop latency and achieved bandwidth from samples {op, nranks, bytes, time_s}."""
    rows, t = [], []
    for s in samples:
        hops, vol = ring_terms(s["op"], s["nranks"], s["bytes"])
        rows.append([hops, vol])
        t.append(s["time_s"])
    alpha, inv_b = lstsq_relative(rows, t)
    if inv_b <= 0:
        raise ValueError("link fit failed: time does not grow with message size")
    pred = [r[0] * alpha + r[1] * inv_b for r in rows]
    return LinkFit(alpha * 1e6, 1.0 / inv_b / 1e9, rms_relative_error(pred, t), len(t))


def fit_op_factors(samples: Sequence[dict], fit: LinkFit, *, min_bytes: float = 2**20) -> dict[str, float]:
    """Per collective, its achieved bandwidth relative to the common fit (comm.op_bandwidth): the
    median over its samples of at least ``min_bytes`` of (ring bytes / fitted bandwidth) over (the
    measured time less the fitted latency hops). Ops within 15% of the common fit get no entry."""
    out: dict[str, float] = {}
    for op in sorted({s["op"] for s in samples}):
        ratios = []
        for s in samples:
            if s["op"] != op or s["bytes"] < min_bytes:
                continue
            hops, vol = ring_terms(op, s["nranks"], s["bytes"])
            wire = s["time_s"] - hops * fit.latency_us * 1e-6
            if wire > 0:
                ratios.append(vol / (fit.bandwidth_gb_per_s * 1e9) / wire)
        if ratios:
            f = sorted(ratios)[len(ratios) // 2]
            if abs(f - 1) > 0.15:
                out[op] = round(f, 3)
    return out


# ---- one coefficient at a time --------------------------------------------------------------

def golden_section(f: Callable[[float], float], lo: float, hi: float, *, iters: int = 30) -> tuple[float, float]:
    """Minimum of a unimodal f on [lo, hi]: (x, f(x)). The end points are tried too, since the best
    value of a bounded coefficient often sits on its bound."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    best = min([(fc, c), (fd, d), (f(lo), lo), (f(hi), hi)])
    return best[1], best[0]


# ---- the loss over the vocabulary: memory bound, cache bound while small ---------------------

@dataclass
class LossFit:
    bandwidth_fraction: float  # of the memory bandwidth, for tensors far larger than the cache
    cache_mib: float  # 0: no cache term fitted (one bandwidth fits all sizes)
    cache_bandwidth_gb_per_s: float | None
    rms_error: float
    points: int


def fit_loss(elements: Sequence[float], time_s: Sequence[float], passes: int, memory_bandwidth_gb_per_s: float) -> LossFit:
    """Fit kdplan.cost.compute.loss_time to measured losses over [tokens x V] fp32 tensors:
    t = E*4*passes * (w/(f*B) + (1-w)/(f*Bc)) with w = S^2/(S^2+C^2), S = 4E bytes. For a fixed cache
    size C the time is linear in (1/(f*B), 1/(f*Bc)): exact least squares; C is searched over
    powers of two (MiB) around the measured sizes, and C = 0 (no cache) competes too."""
    bw = memory_bandwidth_gb_per_s * 1e9
    vol = [e * 4.0 * passes for e in elements]
    a0 = lstsq_relative([[v] for v in vol], time_s)[0]
    best = (rms_relative_error([v * a0 for v in vol], time_s), 0.0, a0, a0)
    sizes = [4.0 * e for e in elements]
    lo, hi = math.log2(min(sizes) / 2**20) - 2, math.log2(max(sizes) / 2**20) + 2
    for k in range(math.floor(lo), math.ceil(hi) + 1):
        c_bytes = 2.0**k * 2**20
        w = [s**2 / (s**2 + c_bytes**2) for s in sizes]
        a, c = lstsq_relative([[v * wi, v * (1 - wi)] for v, wi in zip(vol, w)], time_s)
        if not (a > 0 and 0 < c < 0.99 * a):
            continue  # no faster cache: the one-bandwidth fit stands
        rms = rms_relative_error([v * (a * wi + c * (1 - wi)) for v, wi in zip(vol, w)], time_s)
        if rms < best[0] * 0.98 - 1e-6:  # a cache term must earn its two extra parameters
            best = (rms, 2.0**k, a, c)
    rms, cache_mib, a, c = best
    if a <= 0:
        raise ValueError("loss fit failed: time does not grow with the tensor size")
    frac = min(1.0, 1.0 / (a * bw))
    cache_bw = 1.0 / (c * frac) / 1e9 if cache_mib else None
    return LossFit(frac, cache_mib, cache_bw, rms, len(time_s))


def solve_linear(a: list[list[float]], y: list[float]) -> list[float]:
    """x with a x = y (small dense systems), Gaussian elimination with partial pivoting."""
    n = len(y)
    m = [list(row) + [v] for row, v in zip(a, y)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if not m[col][col]:
            continue
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                if f:
                    m[r] = [x - f * z for x, z in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if m[i][i] else 0.0 for i in range(n)]


def levenberg_marquardt(residuals: Callable[[list[float]], list[float]], u0: list[float], lo: list[float],
                        hi: list[float], *, iters: int = 40, step: float = 1e-3) -> list[float]:
    """Minimise sum(residuals(u)^2) within [lo, hi] by Levenberg-Marquardt with a forward-difference
    Jacobian (the bounds clip each step). Coordinate descent stalls in the narrow valleys that two
    coefficients trading off against each other make; this moves along them."""
    u = [min(h, max(l, x)) for x, l, h in zip(u0, lo, hi)]
    r = residuals(u)
    cost = sum(x * x for x in r)
    mu = 1e-3
    n = len(u)
    for _ in range(iters):
        cols = []
        for j in range(n):
            d = step if u[j] + step <= hi[j] else -step
            uj = list(u)
            uj[j] += d
            cols.append([(a - b) / d for a, b in zip(residuals(uj), r)])
        jtj = [[sum(a * b for a, b in zip(cols[i], cols[k])) for k in range(n)] for i in range(n)]
        jtr = [sum(a * b for a, b in zip(cols[i], r)) for i in range(n)]
        improved = False
        while mu < 1e8:
            a = [[jtj[i][k] + (mu * (jtj[i][i] + 1e-9) if i == k else 0.0) for k in range(n)] for i in range(n)]
            delta = solve_linear(a, [-x for x in jtr])
            cand = [min(h, max(l, x + dx)) for x, dx, l, h in zip(u, delta, lo, hi)]
            rc = residuals(cand)
            c = sum(x * x for x in rc)
            if c < cost:
                done = cost - c < 1e-12 * max(cost, 1e-300)
                u, r, cost, mu = cand, rc, c, max(mu / 10, 1e-9)
                improved = True
                break
            mu *= 10
        if not improved or done:
            break
    return u


# ---- framework fixed costs: T(L, n) = a + b n + L (c + d n) -----------------------------------

@dataclass
class FixedCostFit:
    """Fixed costs of one micro-batch through L blocks at n tokens: ``micro_batch_s`` (a: outside
    the blocks) and ``block_s`` (c: per block), the intercepts at n = 0; per-token slopes b, d
    are the work the FLOP and byte terms price."""

    micro_batch_s: float
    block_s: float
    per_token_s: float
    per_block_token_s: float
    rms_error: float
    points: int


def fit_fixed_costs(samples: Sequence[dict]) -> FixedCostFit:
    """Fit T = a + b n + L (c + d n) (relative least squares, coefficients >= 0) to samples
    {"layers": L, "tokens": n, "time_s": T}; needs two block counts and two token counts."""
    if len({s["layers"] for s in samples}) < 2 or len({s["tokens"] for s in samples}) < 2:
        raise ValueError("fixed costs need samples at 2+ block counts and 2+ token counts")
    rows = [[1.0, float(s["tokens"]), float(s["layers"]), float(s["layers"] * s["tokens"])] for s in samples]
    t = [s["time_s"] for s in samples]
    a, b, c, d = lstsq_relative(rows, t)
    pred = [r[0] * a + r[1] * b + r[2] * c + r[3] * d for r in rows]
    return FixedCostFit(a, c, b, d, rms_relative_error(pred, t), len(samples))


def fit_per_item(counts: Sequence[float], time_s: Sequence[float]) -> tuple[float, float]:
    """(fixed seconds, seconds per item) of T = a + k * count (relative least squares, >= 0)."""
    if len(set(counts)) < 2:
        raise ValueError("a per-item cost needs 2+ different counts")
    a, k = lstsq_relative([[1.0, float(c)] for c in counts], time_s)
    return a, k
