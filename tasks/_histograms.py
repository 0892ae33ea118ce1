"""Calibration histograms in one pass, and the entropy (KL) threshold search over every candidate at once.

`CalibrationHistograms` keeps, per tensor, the two histograms of ONNX Runtime's `HistogramCollector`s
(`onnxruntime/quantization/calibrate.py`): the |x| histogram (method "percentile", symmetric: min/max and
percentile tables) and the signed one (method "entropy"). Their bin grids follow ORT's rules exactly (the
same numpy calls on the same float32 scalars: how the first batch sets the range, how a later batch with a
larger |x| adds bins); only the counting differs. ORT counts each histogram with `np.histogram` (the |x| one
by sorting, as its edges are given explicitly); here one `torch.histc` per tensor and batch counts a grid
`fine` times finer than the signed grid, and both histograms are sums of its bins: the signed one exactly
(up to float rounding at an edge), the |x| one by folding the two halves and giving each fine bin to the
|x| bin holding its centre, which moves a count by at most one |x| bin. Tables therefore agree with ORT's
within one histogram bin (tests/test_calibrate_histograms.py checks it against ORT's collectors).

`entropy_threshold` is ORT's `get_entropy_threshold` (same candidate thresholds, same merged-bin q, same
smoothing) computed for all candidates as one array; the few candidates within float error of the
smallest divergence are then re-scored with ORT's own float32 code, so the choice is ORT's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vitq.errors import DataError

_EMPTY = np.empty(0, np.float32)  # np.histogram on it gives the edges ORT's float32 data would get
HISTC_CHUNK = 1 << 24  # elements per torch.histc call: its float32 counters are exact up to 2**24
MAX_FINE = 32  # fine bins per signed bin beyond which the |x| histogram is counted directly (an extra pass)
EPS = 0.0001  # ORT's smooth_distribution eps


class CalibrationHistograms:
    """|x| and (if `signed`) signed histograms per tensor, merged batch by batch as ORT's collectors merge them."""

    def __init__(self, num_bins: int, num_quantized_bins: int, signed: bool = True, counts: bool = True):
        # counts=False: min/max only (a minmax-only calibration needs no histogram: no counting pass at all)
        self.num_bins, self.num_quantized_bins, self.signed, self.counts = num_bins, num_quantized_bins, signed, counts
        self.abs: dict[str, tuple] = {}  # name -> (hist int64, edges float32, min, max): ORT's percentile collector
        self.value: dict[str, tuple] = {}  # name -> (hist, edges, min, max, threshold): ORT's entropy collector
        self._fold: dict[str, tuple] = {}  # name -> (grid key, fine -> |x| bin index): cached while grids stay
        self._abs_buf = self._mask_buf = None  # scratch for |x| and |x| < e0, reused (see _abs)

    def collect(self, name: str, x: torch.Tensor, batch: str | None = None) -> None:
        """Add one batch of tensor `name` (any shape, float32); `batch` names it in errors (e.g. "images 0-15")."""
        x = x.reshape(-1)
        if x.numel() == 0:
            return
        mn_t, mx_t = torch.aminmax(x)  # NaN if any value is NaN
        mn, mx = np.float32(mn_t.item()), np.float32(mx_t.item())
        if not (np.isfinite(mn) and np.isfinite(mx)):
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"calibration: tensor {name!r} has {bad} non-finite value(s) (NaN/inf) on "
                            f"{batch or 'a calibration batch'}: the model overflows or divides by zero on these images, "
                            "so no range can be calibrated; check the inputs' normalisation and the model's weights")
        if not self.counts:
            old_min, old_max = self.abs[name][2:] if name in self.abs else (mn, mx)
            self.abs[name] = (None, None, min(old_min, mn), max(old_max, mx))
            return
        amax = np.float32(max(abs(mn), abs(mx)))
        abs_edges, abs_new = self._abs_edges(name, x, amax)
        value_edges, offset, threshold = self._value_edges(name, amax)
        n_value = len(value_edges) - 1
        abs_width = float(abs_edges[1]) - float(abs_edges[0])
        span = float(value_edges[-1]) - float(value_edges[0])
        fine = max(2, 2 * math.ceil(2 * span / (n_value * abs_width)))  # even; fine bin <= a quarter |x| bin
        e0 = float(abs_edges[0])  # the first batch's min |x|: ORT drops a later batch's |x| below it
        # Count |x| directly (an extra pass) where folding could not match ORT within a bin: |x| bins far narrower
        # than signed ones, a first |x| edge past fine bin 0, or |x| past the last edge (ORT's arange fell short).
        direct = fine > MAX_FINE or e0 >= span / (n_value * fine) or amax > abs_edges[-1]
        counts = _histc(x, n_value * (1 if direct else fine), float(value_edges[0]), float(value_edges[-1]))
        if direct:
            value_hist = counts
            abs_hist = _histc(self._abs(x), len(abs_edges) - 1, e0, float(abs_edges[-1]))
        else:
            value_hist = counts.reshape(n_value, fine).sum(1)
            half = len(counts) // 2
            folded = counts[half:] + counts[:half][::-1]  # |x| in [j, j + 1) fine bins from 0
            if not abs_new and e0 > 0 and mn < e0 and mx > -e0:
                # The |x| < e0 ORT drops lie in fine bin 0. Their count moves the total, hence a percentile's
                # rank, which in a sparse tail moves the percentile many bins: count them exactly.
                folded[0] -= int(torch.count_nonzero(torch.lt(self._abs(x), e0, out=self._mask_buf[: x.numel()])))
            abs_hist = np.bincount(*self._fold_index(name, span / len(counts), half, abs_edges, folded),
                                   minlength=len(abs_edges) - 1).astype(np.int64)
        # Merge, as ORT: the |x| histogram grows at the end; the signed one by `offset` bins on both sides.
        if abs_new:
            if name in self.abs:  # the grid rebuilt over an all-zero start (see _abs_edges): its zeros into bin 0
                old, _, old_min, old_max = self.abs[name]
                abs_hist[0] += old.sum()
                self.abs[name] = (abs_hist, abs_edges, min(old_min, mn), max(old_max, mx))
            else:
                self.abs[name] = (abs_hist, abs_edges, mn, mx)
        else:
            old, _, old_min, old_max = self.abs[name]
            abs_hist[: len(old)] += old
            self.abs[name] = (abs_hist, abs_edges, min(old_min, mn), max(old_max, mx))
        if self.signed:
            if name in self.value:
                old, _, old_min, old_max, _ = self.value[name]
                value_hist[offset : offset + len(old)] += old
                mn, mx = min(old_min, mn), max(old_max, mx)
            self.value[name] = (value_hist, value_edges, mn, mx, threshold)

    def _abs(self, x: torch.Tensor) -> torch.Tensor:
        """|x| (1-D) in a buffer reused from call to call: a fresh tensor each time costs more in page faults
        than the op itself (a ViT-B batch's fc2 input is 78 MB; measured 1.7 vs 0.2 ns a value)."""
        n = x.numel()
        if self._abs_buf is None or self._abs_buf.numel() < n:
            self._abs_buf = torch.empty(n, dtype=torch.float32)
            self._mask_buf = torch.empty(n, dtype=torch.bool)
        return torch.abs(x, out=self._abs_buf[:n])

    def _abs_edges(self, name: str, x: torch.Tensor, amax: np.float32) -> tuple[np.ndarray, bool]:
        """ORT's collect_absolute_value grid: the first batch spans [min |x|, max |x|] in num_bins bins; a later
        batch with a larger |x| appends bins of the same width. Returns (edges, a new grid?).
        Unlike ORT, a tensor that was exactly zero so far gets a new grid over [0, max |x|] when nonzero values
        come: its first grid is numpy's for a zero span, [-0.5, 0.5], whose bins of 1/num_bins would hold a later
        small-valued batch in a few bins (a range off by up to 1/num_bins), or a large one in millions of bins."""
        if name in self.abs and self.abs[name][2] == 0 == self.abs[name][3] and amax > 0:
            return _grid(np.float32(0), amax, self.num_bins), True
        if name not in self.abs:
            amin = np.float32(self._abs(x).min().item())  # first batch only
            return _grid(amin, amax, self.num_bins), True
        edges = self.abs[name][1]
        if amax > edges[-1]:
            width = edges[1] - edges[0]
            # NOTE (ORT's): np.arange may create an extra bin after the one containing amax
            edges = np.hstack((edges, np.arange(edges[-1] + width, amax + width, width))).astype(np.float32)
        return edges, False

    def _value_edges(self, name: str, amax: np.float32) -> tuple[np.ndarray, int, np.ndarray]:
        """ORT's collect_value/merge_histogram grid: symmetric (-t, t), num_bins bins at first; a batch with a
        larger |x| adds whole bins of the old width on both sides. Returns (edges, bins added on each side, t)."""
        threshold = np.array(amax, dtype=np.float32)
        if not _fits(-threshold, threshold, self.num_bins):
            threshold = np.array(0, dtype=np.float32)  # |x| too small for the grid (below 1e-41): as zero, as ORT's scale
        if not self.signed or name not in self.value:
            return np.histogram(_EMPTY, self.num_bins, range=(-threshold, threshold))[1], 0, threshold
        old_hist, old_edges, _, _, old_threshold = self.value[name]
        if threshold <= old_threshold:
            return old_edges, 0, old_threshold
        if old_threshold == 0:
            return np.histogram(_EMPTY, len(old_hist), range=(-threshold, threshold))[1], 0, threshold
        old_num_bins = len(old_hist)
        old_stride = 2 * old_threshold / old_num_bins
        half_increased_bins = int((threshold - old_threshold) // old_stride + 1)
        new_threshold = half_increased_bins * old_stride + old_threshold
        new_num_bins = old_num_bins + 2 * half_increased_bins
        edges = np.histogram(_EMPTY, new_num_bins, range=(-new_threshold, new_threshold))[1]
        return edges, half_increased_bins, new_threshold

    def _fold_index(self, name, step, half, abs_edges, folded) -> tuple[np.ndarray, np.ndarray]:
        """(|x| bin, count) of the folded fine bins: fine bin 0 (holding the first edge) to |x| bin 0, the others
        to the |x| bin holding their centre, one past the last edge to the last bin (|x| <= the last edge)."""
        key = (step, half, len(abs_edges), float(abs_edges[0]))
        cached = self._fold.get(name)
        if cached is None or cached[0] != key:
            left = np.arange(half) * step
            idx = np.searchsorted(abs_edges, left + step / 2, side="right") - 1
            idx[0] = 0
            idx = np.where((idx >= len(abs_edges) - 1) & (left <= abs_edges[-1]), len(abs_edges) - 2, idx)
            keep = (idx >= 0) & (idx < len(abs_edges) - 1)
            cached = (key, idx, keep)
            self._fold[name] = cached
        _, idx, keep = cached
        return idx[keep], folded[keep]

    def save(self, path) -> None:
        """Write the merged histograms to `path` (.npz): the calibrate stage keeps them beside its tables, so the
        range search over the same graph and images reads them instead of counting again."""
        import json

        names = self.names()
        arrays = {"meta": np.array(json.dumps({"names": names, "num_bins": self.num_bins, "signed": self.signed,
                                               "num_quantized_bins": self.num_quantized_bins}))}
        for i, t in enumerate(names):
            hist, edges, mn, mx = self.abs[t]
            arrays.update({f"abs{i}": hist, f"abs{i}_edges": edges, f"abs{i}_minmax": np.array([mn, mx], np.float32)})
            if self.signed:
                hist, edges, mn, mx, threshold = self.value[t]
                arrays.update({f"val{i}": hist, f"val{i}_edges": edges,
                               f"val{i}_minmax": np.array([mn, mx, threshold], np.float32)})
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    def digest(self) -> str:
        """sha256 of the histograms' content (names, counts, edges, ranges): what `save` writes, without the zip
        timestamps that make the file's own bytes differ between two equal calibrations."""
        import hashlib

        h = hashlib.sha256(repr((self.names(), self.num_bins, self.num_quantized_bins, self.signed)).encode())
        for t in self.names():
            for part in (*self.abs[t], *(self.value[t] if self.signed else ())):
                h.update(np.asarray(part).tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path) -> CalibrationHistograms:
        """What `save` wrote (values as `collect` left them: the same tables come out)."""
        import json

        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            h = cls(meta["num_bins"], meta["num_quantized_bins"], signed=meta["signed"])
            for i, t in enumerate(meta["names"]):
                mn, mx = (np.float32(v) for v in z[f"abs{i}_minmax"])
                h.abs[t] = (z[f"abs{i}"], z[f"abs{i}_edges"], mn, mx)
                if h.signed:
                    mn, mx, threshold = z[f"val{i}_minmax"]
                    h.value[t] = (z[f"val{i}"], z[f"val{i}_edges"], np.float32(mn), np.float32(mx),
                                  np.array(threshold, dtype=np.float32))
        return h

    # The tables, from the merged histograms.
    def names(self) -> list[str]:
        return sorted(self.abs)

    def select(self, names) -> None:
        """Keep only `names` (the tensors a search will judge)."""
        keep = set(names)
        self.abs = {t: h for t, h in self.abs.items() if t in keep}
        self.value = {t: h for t, h in self.value.items() if t in keep}

    def minmax_ranges(self) -> dict[str, tuple[float, float]]:
        return {t: (h[2], h[3]) for t, h in self.abs.items()}

    def percentile_ranges(self, percentile: float) -> dict[str, tuple[float, float]]:
        """ORT's compute_percentile (symmetric) on the |x| histograms: (-edge, edge) at the percentile, clipped to min/max."""
        from onnxruntime.quantization.calibrate import HistogramCollector

        from vitq.tasks._io import quiet_stdout

        collector = HistogramCollector("percentile", True, self.num_bins, self.num_quantized_bins, percentile, "same")
        collector.histogram_dict = self.abs
        with quiet_stdout():  # it prints
            ranges = {t: r[:2] for t, r in collector.compute_percentile().items()}
        # ORT's clipping to [min, max] leaves low > high where the percentile's bin edge lies below every value (the
        # tensor's spread is under one bin: constant or near-constant, e.g. a uniform softmax); all-zero tensors come
        # out as (0.5, -0.5). Those get their observed range: ORT's scale from (low, high) ignores a positive low, so
        # the table would otherwise clip the tensor's every value to one bin below it (or, for zeros, be nonsense).
        for t, (low, high) in ranges.items():
            if low > high:
                ranges[t] = self.abs[t][2], self.abs[t][3]
        return ranges

    def entropy_range(self, name: str) -> tuple[float, float]:
        if not self.signed:
            raise ValueError("entropy ranges need the signed histograms (CalibrationHistograms(signed=True))")
        hist, edges, mn, mx, _ = self.value[name]
        return entropy_threshold(hist, edges, mn, mx, self.num_quantized_bins)


def _fits(lo, hi, bins: int) -> bool:
    """Whether `bins` equal float32 bins over [lo, hi] have distinct edges (numpy's histogram refuses the grid
    otherwise: "Too many bins for data range"); a zero span counts as fitting (numpy widens it by 0.5 each side)."""
    lo, hi = np.float32(lo), np.float32(hi)
    if lo == hi:
        return True
    edges = np.linspace(lo, hi, bins + 1, dtype=np.float32)
    return bool(np.all(edges[:-1] < edges[1:]))


def _grid(amin: np.float32, amax: np.float32, bins: int) -> np.ndarray:
    """ORT's first-batch |x| grid: `bins` equal bins over [amin, amax] (numpy's edges on float32 data). A span too
    narrow for that many distinct float32 edges (a near-constant tensor, e.g. a uniform softmax: every value
    1/49 within a few ulps), where ORT's collector crashes in numpy, gets [0, amax] instead: the same
    values, in bins of amax / bins; and below even that (|x| < 1e-41, which ORT quantizes with scale 1 anyway),
    numpy's own grid for a zero span, [amax - 0.5, amax + 0.5]."""
    if _fits(amin, amax, bins):
        lo, hi = amin, amax
    elif _fits(0, amax, bins):
        lo, hi = np.float32(0), amax
    else:
        lo = hi = amax
    return np.histogram(np.array([lo, hi], np.float32), bins=bins)[1].astype(np.float32)


def _histc(x: torch.Tensor, bins: int, lo: float, hi: float) -> np.ndarray:
    """Counts (int64) of `x` (1-D) in `bins` equal bins over [lo, hi] (values outside ignored), in chunks
    small enough for torch.histc's float32 counters to stay exact."""
    total = torch.zeros(bins, dtype=torch.float64)
    for part in x.split(HISTC_CHUNK):
        total += torch.histc(part, bins, lo, hi)
    return total.numpy().astype(np.int64)


def _divergences(hist: np.ndarray, nq: int, i: np.ndarray) -> np.ndarray:
    """KL(p || q) (float64) of ORT's candidates `i` (half widths, in bins, around the centre bin), with p and q
    as get_entropy_threshold builds them, for all candidates at once in O(nq) each, from prefix sums over
    the histogram: p is the histogram slice (outliers added to its end bins); q spreads each of the nq merged
    bins' counts evenly (floored) over its nonzero-p bins; both smoothed (zeros -> EPS, nonzeros -= eps1).
    With p' and q' smoothed: KL = (sum p' log p' - sum p' log q') / sum p' + log(sum q' / sum p'), where
    sum p' = N (every count) and q' is constant over a merged bin. sum p' log p' over the slice's inner bins
    uses (h - e) log(h - e) = h log h - e (log h + 1) + e^2 / 2h + e^3 / 6h^2 + e^4 / 12h^3 (e = eps1 < 1 <= h:
    the rest is below 1e-4 a bin, 1e-4 / N of the divergence). Shape (len(i),)."""
    h = hist.astype(np.float64)
    n = h.size
    z = n // 2
    start, end = z - i, np.minimum(z + i + 1, n)
    length = end - start
    merged = length // nq  # source bins per quantized bin
    nonzero = h != 0
    safe = np.where(nonzero, h, 1.0)

    def prefix(v):
        return np.concatenate([[0.0], np.cumsum(np.where(nonzero, v, 0.0))])

    cum, cum_nz = prefix(h), prefix(np.ones(n))
    cum_hlogh, cum_logh = prefix(h * np.log(safe)), prefix(np.log(safe))
    cum_inv1, cum_inv2, cum_inv3 = prefix(1 / safe), prefix(safe**-2.0), prefix(safe**-3.0)
    total = cum[n]
    left, right = cum[start], total - cum[end]  # outliers, into the end bins
    p_first, p_last = h[start] + left, h[end - 1] + right

    def inner(c):  # sum over the slice's inner bins (start, end - 1)
        return c[end - 1] - c[start + 1]

    nnz_p = inner(cum_nz) + (p_first != 0) + (p_last != 0)
    eps1_p = EPS * (length - nnz_p) / np.maximum(nnz_p, 1)

    def plogp(v):  # (v - eps1_p) log(v - eps1_p), 0 where v == 0
        w = np.where(v != 0, v - eps1_p, 1.0)
        return np.where(v != 0, w * np.log(w), 0.0)

    e = eps1_p
    p_log_p = (inner(cum_hlogh) - e * (inner(cum_logh) + inner(cum_nz)) + e**2 / 2 * inner(cum_inv1)
               + e**3 / 6 * inner(cum_inv2) + e**4 / 12 * inner(cum_inv3)
               + plogp(p_first) + plogp(p_last) + (length - nnz_p) * EPS * np.log(EPS))
    # Merged bins k: source bins [a_k, b_k); the rest of the slice (`tail`) has q = 0.
    rows = np.arange(len(i))
    a = start[:, None] + merged[:, None] * np.arange(nq)[None, :]
    b = a + merged[:, None]
    tail_start = start + nq * merged
    sliced_sum = cum[b] - cum[a]
    quantized = sliced_sum.copy()
    quantized[:, -1] += cum[end] - cum[tail_start]
    p_sum, nnz = sliced_sum.copy(), cum_nz[b] - cum_nz[a]
    p_sum[:, 0] += left
    nnz[:, 0] += (p_first != 0).astype(np.float64) - nonzero[start]
    last_nz_change = (p_last != 0).astype(np.float64) - nonzero[end - 1]
    in_merged = length - 1 < nq * merged  # the last bin (with the right outliers) is in a merged bin, else in the tail
    k_last = np.minimum((length - 1) // merged, nq - 1)
    nnz[rows[in_merged], k_last[in_merged]] += last_nz_change[in_merged]
    p_sum[rows[in_merged], k_last[in_merged]] += right[in_merged]
    tail_nnz = cum_nz[end] - cum_nz[tail_start] + np.where(in_merged, 0.0, last_nz_change)
    tail_sum = cum[end] - cum[tail_start] + np.where(in_merged, 0.0, right)
    level = np.where(nnz > 0, np.floor(quantized / np.maximum(nnz, 1)), 0.0)  # ORT: int64 q = quantized / norm
    nnz_q = merged * (level > 0).sum(1)
    sum_q = merged * level.sum(1)
    eps1_q = EPS * (length - nnz_q) / np.maximum(nnz_q, 1)
    q_smooth = np.where(level > 0, level - eps1_q[:, None], EPS)
    p_smooth_sum = p_sum - eps1_p[:, None] * nnz + EPS * (merged[:, None] - nnz)
    tail_smooth_sum = tail_sum - eps1_p * tail_nnz + EPS * (length - nq * merged - tail_nnz)
    p_log_q = (np.log(q_smooth) * p_smooth_sum).sum(1) + np.log(EPS) * tail_smooth_sum
    kl = (p_log_p - p_log_q) / total - np.log(total) + np.log(np.where(sum_q > 0, sum_q, 1.0))
    return np.where((nnz_p > 0) & (nnz_q > 0), kl, np.inf)


def _divergence_ort(hist: np.ndarray, nq: int, i: int, dtype) -> float:
    """One candidate's KL exactly as ORT's get_entropy_threshold computes it (float32, its own helpers)."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    n = hist.size
    z = n // 2
    start, end = z - i, min(z + i + 1, n)
    sliced = hist[start:end]
    p = sliced.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[end:].sum()
    nonzeros = (p != 0).astype(np.int64)
    merged = sliced.size // nq
    quantized = sliced[: nq * merged].reshape(nq, merged).sum(1)
    quantized[-1] += sliced[nq * merged :].sum()
    norm = nonzeros[: nq * merged].reshape(nq, merged).sum(1)
    q = np.zeros(p.size, dtype=np.int64)
    q[: nq * merged] = np.repeat(np.where(norm != 0, quantized // np.maximum(norm, 1), 0), merged)
    p, q = smooth_distribution(p), smooth_distribution(q)
    if p is None or q is None:
        return float(np.array(np.inf, dtype=dtype))
    return float(np.array(entropy(p, q), dtype=dtype))


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, mn, mx, num_quantized_bins: int):
    """ORT's HistogramCollector.get_entropy_threshold on one signed histogram: (low, high), clipped to (mn, mx)."""
    n = hist.size
    z, hq = n // 2, num_quantized_bins // 2
    if z < hq:
        raise ValueError(f"entropy: {n} histogram bins are fewer than num_quantized_bins {num_quantized_bins}")
    candidates = np.arange(hq, z + 1)
    kl = _divergences(hist, num_quantized_bins, candidates)
    if np.isfinite(kl).any():
        best = np.nanmin(kl)
        # float64 here vs ORT's float32 sums: re-score every candidate within float32 error of the best with ORT's code
        close = np.flatnonzero(kl <= best + 1e-3 * abs(best) + 1e-4)
        exact = [_divergence_ort(hist, num_quantized_bins, int(candidates[c]), edges.dtype) for c in close]
        chosen = int(candidates[close[int(np.argmin(exact))]])  # argmin: the first of equals, as ORT's
    else:
        chosen = int(candidates[0])  # every divergence infinite: ORT's argmin picks the first
    low, high = edges[z - chosen], edges[min(z + chosen + 1, n)]
    if low < mn:
        low = mn
    if high > mx:
        high = mx
    return low, high
