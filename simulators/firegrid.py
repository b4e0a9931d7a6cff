"""A constant-time, exact SFN fire function: a table over the float32 bit pattern, one comparison.

``torch.bucketize`` (a binary search per element, one per polarity) dominated the SNN's run time.
Both polarities become one ascending list of float32 thresholds T with
``signed index = #{T ≤ x} − N⁻``: a positive boundary b fires at x ≥ b; a negative one fires at
−x ≥ b, i.e. x ≤ −b, i.e. *not* x ≥ nextafter(−b, +∞) — all float32 comparisons, so exact.
The top bits of x's float32 bit pattern split the number line into cells, each a contiguous range
of floats, with no rounding at all; the shift is chosen so that no cell holds two thresholds.
Per cell, ``base`` = #{T ≤ the cell's lowest float} and ``inner`` = the one threshold inside the
cell (NaN if none), so #{T ≤ x} = base + [x ≥ inner]. Each table is checked against bucketize at
every threshold, its float32 neighbours and every cell's ends when built; a site whose table
would need more than 2^20 cells, or fails the check, keeps bucketize.

The same rule also runs as one fused C loop (:func:`native`: cell, comparison, value lookup and, if
asked, the histogram of positions, in one pass over the data instead of six), compiled once with the
system's C compiler (about a second, cached under ``$SFN_CACHE`` or ``~/.cache/sfn_deploy``) and called
through ctypes. It does the very same float32 comparisons and copies, so its results are bit-identical;
without a compiler, or with ``SFN_NATIVE=0``, the torch operations run instead. A large tensor is split
over as many threads as torch may use (``torch.get_num_threads()``), each part with its own histogram;
built with ``-fopenmp`` the parts run on the OpenMP runtime torch already loaded, so the simulator and
torch's kernels share one pool of threads (a compiler without OpenMP gives a serial build: same results).

The library also holds calibration's three per-batch kernels (:func:`signed_counts`, :func:`count_equal`,
:func:`mode_rows`: one pass each instead of a dozen torch passes or a sort per channel), for the same reason and
with the same guarantee: the counts and values of the torch ops they replace, bit for bit.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
import torch

from sfn_deploy.neurons import NODE_CACHE, level_table, spike_index

MAX_BITS = 20          # at most 2^20 cells (8 MB of tables)


class FireGrid:
    def __init__(self, node):
        p = node.params
        bp = p["bounds_pos"].to("cpu", torch.float32).numpy()
        bn = p["bounds_neg"].to("cpu", torch.float32).numpy()
        self.n = p["table"].numel() - 1
        self.n_neg = len(bn)
        t = np.sort(np.concatenate([bp, np.nextafter(-bn, np.float32(np.inf)).astype(np.float32)]))
        self.ok = len(t) > 0 and bool(np.all(np.isfinite(t))) and bool(np.all(np.diff(t) > 0))
        if not self.ok:
            return
        bits = t.view(np.uint32).astype(np.int64)
        # the largest shift that keeps consecutive thresholds in different cells
        differ = [int(a ^ b).bit_length() - 1 for a, b in zip(bits[:-1], bits[1:], strict=True)]
        shift = min(differ + [31])
        self.shift = max(shift, 32 - MAX_BITS)
        if shift < self.shift:
            self.ok = False
            return
        cells = 1 << (32 - self.shift)
        self.offset = 1 << (31 - self.shift)              # (int32 bits >> shift) + offset ∈ [0, cells)
        high = np.arange(cells, dtype=np.int64) - self.offset
        start = (high << self.shift).astype(np.int32).view(np.float32)
        end = ((high << self.shift) + (1 << self.shift) - 1).astype(np.int32).view(np.float32)
        with np.errstate(invalid="ignore"):               # the cells of NaN bit patterns (signalling ones too)
            low = np.where(high < 0, end, start)           # negative floats run backwards in int order
            top = np.where(high < 0, start, end)
            low = np.where(np.isnan(low) & np.isneginf(top), -np.inf, low).astype(np.float32)   # −inf with −NaNs
            base = np.searchsorted(t.astype(np.float64), low.astype(np.float64), side="right")
            inner_i = np.minimum(base, len(t) - 1)
            inside = (t[inner_i] > low) & (t[inner_i] <= top)
            inner = np.where(inside, t[inner_i], np.float32(np.nan)).astype(np.float32)
        # output-table position: signed index + n
        self.base = torch.from_numpy((base - self.n_neg + self.n).astype(np.int32))
        self.inner = torch.from_numpy(inner)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}     # (base, inner) per GPU
        self.ok = self._agrees(node, t, low, top)

    def fire(self, x: torch.Tensor, values: torch.Tensor, hist: bool = False, position: bool = True,
             out: torch.Tensor | None = None):
        """(values[position], position or None, histogram of positions or None) for float32 x: the output
        contiguous, the position int32 of x's shape (only if ``position``), the histogram int64 over the
        2n+1 positions (only if ``hist``). One fused pass over x, split over torch's threads, when the native loop is
        available; otherwise the torch operations. ``out``: a contiguous float32 tensor of x's shape (x itself
        allowed: each element is read before it is written) that the native loop writes the output into; a
        strided x is copied first (into ``out``, where given), and the output goes over the copy."""
        lib = native() if x.numel() >= _NATIVE_MIN and x.device.type == "cpu" else None
        bins = 2 * self.n + 1
        if lib is None:
            every = self.position(x)
            out = torch.index_select(values, 0, every.reshape(-1)).view(every.shape)
            return (out, every if position else None,
                    torch.bincount(every.reshape(-1), minlength=bins) if hist else None)
        if not x.is_contiguous():  # (a strided read in the loop measured no faster than this copy)
            if out is not None and _fits(out, x):
                x = out.copy_(x)   # the copy in the caller's buffer, the output over it
            else:
                x = x.contiguous()
                out = x if out is None else out     # the copy is this call's own: the output goes over it
        values = values.contiguous()
        if out is None or not _fits(out, x):
            out = torch.empty(x.shape, dtype=torch.float32)
        pos = torch.empty(x.shape, dtype=torch.int32) if position else None
        n, parts = x.numel(), _parts(x.numel())
        h = torch.zeros(parts, bins, dtype=torch.int64) if hist else None
        lib.sfn_fire_parts(x.data_ptr(), n, self.shift, self.base.data_ptr(), self.inner.data_ptr(),
                           values.data_ptr(), out.data_ptr(), None if pos is None else pos.data_ptr(),
                           None if h is None else h.data_ptr(), bins, parts)
        return out, pos, None if h is None else h.sum(0)

    def position(self, x: torch.Tensor) -> torch.Tensor:
        """signed index + n (the row of the site's level table), int32, same shape as x."""
        flat = x.reshape(-1)
        c = (flat.view(torch.int32) >> self.shift).add_(self.offset)
        base, inner = self.tables(x.device)
        k = torch.index_select(base, 0, c)
        k += flat >= torch.index_select(inner, 0, c)
        return k.view(x.shape)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, inner) where x is: the CPU's own, or a copy made once per device."""
        if device.type == "cpu":
            return self.base, self.inner
        if device not in self._on:
            self._on[device] = (self.base.to(device), self.inner.to(device))
        return self._on[device]

    def _agrees(self, node, t: np.ndarray, low: np.ndarray, top: np.ndarray) -> bool:
        ends = np.concatenate([low, top])
        ends = ends[np.isfinite(ends)]
        probes = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf)),
                                 ends, [0.0, -0.0, np.inf, -np.inf, 1e30, -1e30]]).astype(np.float32)
        x = torch.from_numpy(probes)
        ref = spike_index(node, x.to(node.params["bounds_pos"].device)).cpu()     # where the node's bounds are
        return bool(torch.equal(self.position(x).to(torch.int64) - self.n, ref))


def _fits(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``out`` can take the native loop's output for x (dense float32 of x's shape)."""
    return out.shape == x.shape and out.is_contiguous() and out.dtype == torch.float32


def grid_for(node) -> FireGrid | None:
    """The node's table (None where bucketize must serve), rebuilt whenever its boundaries were replaced
    (``passes.configure``); kept in :data:`sfn_deploy.neurons.NODE_CACHE`."""
    p = node.params
    grid = NODE_CACHE.get(node, "grid", (p["bounds_pos"], p["bounds_neg"]), lambda: FireGrid(node))
    return grid if grid.ok else None


def fire(node, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, position) of a neuron node: :func:`sfn_deploy.neurons.fire`, bit for bit, in constant time."""
    out, pos, _ = fire_with(node, x)
    return out, pos


def fire_with(node, x: torch.Tensor, hist: bool = False, position: bool = True, out: torch.Tensor | None = None):
    """(output, position or None, histogram of positions or None) of a neuron node: the fire rule of
    :func:`sfn_deploy.neurons.fire`, bit for bit, through the node's grid for float32 (else bucketize).
    ``position``: return the int32 positions (signed index + N); ``hist``: their int64 histogram (2N+1 bins);
    ``out``: where the native loop may write the output (x itself allowed; :meth:`FireGrid.fire`)."""
    n = node.params["table"].numel() - 1
    values = level_table(node, x.dtype)
    grid = grid_for(node) if x.dtype == torch.float32 else None
    if grid is not None:
        return grid.fire(x, values, hist, position, out)
    pos = (spike_index(node, x) + n).to(torch.int32)
    out = torch.index_select(values, 0, pos.reshape(-1)).view(pos.shape)
    return out, pos if position else None, torch.bincount(pos.reshape(-1), minlength=2 * n + 1) if hist else None


# The fused loop. A cell is (bits ^ 2^31) >> shift, which equals (int32 bits >> shift) + offset: the loop
# shifts the signed bits arithmetically and reads tables based at their middle (one instruction fewer per element);
# the comparison is the same float32 ``x >= inner`` (ordered: false for NaN) and the value a copy of
# values[position]. Blocks of 256 elements: positions first (8 at a time with AVX2 gathers where the CPU has
# them, checked at run time), then their histogram from the block in L1 (counting inside the position loop made
# each increment wait on the table reads: twice the loop's time), in four partial uint32 histograms.
_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SFN_SCALAR)
#include <immintrin.h>
#define SFN_X86 1
#endif

#define BLOCK 256
#define SMALL_BINS 1024             /* histograms up to this many bins count in uint32 partials */
#define FLUSH ((int64_t)1 << 30)    /* ... folded into the int64 result before a partial could overflow */

/* base, inner: the tables' middle entries (cell offset), so that a negative signed cell reads below them */
static inline int32_t cell_pos(const float *x, int shift, const int32_t *base, const float *inner) {
    int32_t b;
    memcpy(&b, x, 4);
    int32_t c = b >> shift;       /* arithmetic: gcc and clang */
    return base[c] + (*x >= inner[c]);
}

static void block_scalar(const float *x, int64_t m, int shift, const int32_t *base, const float *inner,
                         const float *values, float *out, int32_t *k) {
    for (int64_t j = 0; j < m; j++) {
        int32_t p = cell_pos(x + j, shift, base, inner);
        out[j] = values[p];
        k[j] = p;
    }
}

#ifdef SFN_X86
/* the same, eight at a time: the same cells, the same ordered float32 comparison, the same copies */
__attribute__((target("avx2"))) static void block_avx2(const float *x, int64_t m, int shift, const int32_t *base,
                                                       const float *inner, const float *values, float *out,
                                                       int32_t *k) {
    __m128i sh = _mm_cvtsi32_si128(shift);
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        __m256i c = _mm256_sra_epi32(_mm256_castps_si256(v), sh);
        __m256i b = _mm256_i32gather_epi32((const int *)base, c, 4);
        __m256 ge = _mm256_cmp_ps(v, _mm256_i32gather_ps(inner, c, 4), _CMP_GE_OQ);
        __m256i p = _mm256_sub_epi32(b, _mm256_castps_si256(ge));          /* true is -1 */
        _mm256_storeu_ps(out + j, _mm256_i32gather_ps(values, p, 4));
        _mm256_storeu_si256((__m256i *)(k + j), p);
    }
    block_scalar(x + j, m - j, shift, base, inner, values, out + j, k + j);
}
#endif

static int simd = -1;               /* -1: not decided yet; sfn_simd(0) forces the scalar loop (tests) */

/* want: 0 scalar, 1 SIMD where the CPU has it, -1 query; returns whether the SIMD loop runs */
int sfn_simd(int want) {
    int have = 0;
#ifdef SFN_X86
    __builtin_cpu_init();
    have = __builtin_cpu_supports("avx2") != 0;
#endif
    if (want >= 0 || simd < 0)
        simd = want == 0 ? 0 : have;
    return simd;
}

/* n elements: out = values[k], pos = k (pos may be NULL), hist += counts of k (NULL: none; bins int64) */
void sfn_fire(const float *x, int64_t n, int shift, const int32_t *base0, const float *inner0,
              const float *values, float *out, int32_t *pos, int64_t *hist, int64_t bins) {
    const int64_t offset = (int64_t)1 << (31 - shift);
    const int32_t *base = base0 + offset;
    const float *inner = inner0 + offset;
    int use_simd = simd < 0 ? sfn_simd(-1) : simd;
    int32_t kb[BLOCK];
    uint32_t part[4][SMALL_BINS];
    int small = bins <= SMALL_BINS;
    if (hist && small)
        for (int r = 0; r < 4; r++) memset(part[r], 0, (size_t)bins * sizeof(uint32_t));
    int64_t since = 0;
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t m = n - i < BLOCK ? n - i : BLOCK;
        int32_t *k = pos ? pos + i : kb;
#ifdef SFN_X86
        if (use_simd)
            block_avx2(x + i, m, shift, base, inner, values, out + i, k);
        else
#endif
            block_scalar(x + i, m, shift, base, inner, values, out + i, k);
        if (!hist)
            continue;
        if (!small) {
            for (int64_t j = 0; j < m; j++) hist[k[j]]++;
            continue;
        }
        int64_t j = 0;
        for (; j + 4 <= m; j += 4) {
            part[0][k[j]]++; part[1][k[j + 1]]++; part[2][k[j + 2]]++; part[3][k[j + 3]]++;
        }
        for (; j < m; j++) part[0][k[j]]++;
        since += m;
        if (since >= FLUSH || i + m >= n) {
            for (int64_t b = 0; b < bins; b++) {
                hist[b] += (int64_t)part[0][b] + part[1][b] + part[2][b] + part[3][b];
                part[0][b] = part[1][b] = part[2][b] = part[3][b] = 0;
            }
            since = 0;
        }
    }
}

/* per sample element e, sums over the batch of |y|, 1[y != 0] and k read from each position (int64, exact):
   acc[e], acc[elems + e], acc[2 * elems + e] += (mag, active, k)[pos[b * elems + e]] */
void sfn_spike_sums(const int32_t *pos, int64_t batch, int64_t elems, const int64_t *mag, const int64_t *active,
                    const int64_t *k, int64_t *acc) {
    int64_t *a = acc, *e = acc + elems, *c = acc + 2 * elems;
    for (int64_t b = 0; b < batch; b++) {
        const int32_t *p = pos + b * elems;
        for (int64_t i = 0; i < elems; i++) {
            int32_t q = p[i];
            a[i] += mag[q];
            e[i] += active[q];
            c[i] += k[q];
        }
    }
}

/* calibration's signed histogram in one pass (calibrate.update_signed): a positive x counts in
   hist[min((int64)(x * sp), bins - 1)], a negative one in hist[bins + min((int64)(x * sn), bins - 1)] (sn < 0),
   a NaN in hist[bins] (where the torch ops put it), zeros nowhere; float32 products truncated, as torch's.
   Over `parts` equal ranges on OpenMP threads: part j counts into hist + j * 2 * bins. */
static void hist_signed(const float *x, int64_t n, float sp, float sn, int64_t bins, int64_t *hist) {
    int64_t top = bins - 1, *neg = hist + bins;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (v > 0) {
            int64_t k = (int64_t)(v * sp);
            hist[k < top ? k : top]++;
        } else if (v < 0) {
            int64_t k = (int64_t)(v * sn);
            neg[k < top ? k : top]++;
        } else if (v != v) {
            neg[0]++;
        }
    }
}

void sfn_hist_signed(const float *x, int64_t n, float sp, float sn, int64_t bins, int64_t *hist, int parts) {
    int64_t step = (n + (int64_t)parts - 1) / (int64_t)parts;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int j = 0; j < parts; j++) {
        int64_t start = j * step, stop = start + step < n ? start + step : n;
        if (start < stop)
            hist_signed(x + start, stop - start, sp, sn, bins, hist + j * 2 * bins);
    }
}

/* calibration's repeated values: per channel c, how many x[o][c][i] equal value[c] (x: outer × C × inner;
   inner = 1 for channels last); part j of the outer range counts into counts + j * C */
void sfn_count_equal(const float *x, int64_t outer, int64_t chans, int64_t inner, const float *value,
                     int64_t *counts, int parts) {
    int64_t step = (outer + (int64_t)parts - 1) / (int64_t)parts;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int j = 0; j < parts; j++) {
        int64_t *k = counts + j * chans;
        for (int64_t o = j * step; o < outer && o < (j + 1) * step; o++)
            for (int64_t c = 0; c < chans; c++) {
                const float *row = x + (o * chans + c) * inner;
                float v = value[c];
                int64_t m = 0;
                for (int64_t i = 0; i < inner; i++)
                    m += row[i] == v;
                k[c] += m;
            }
    }
}

/* calibration's repeated values: the most frequent value of each row of s (rows × m, float32), ties to the
   smallest, torch.mode's rule on the CPU, counted in a hash table instead of a sort. Returns how many rows hold
   a NaN or a modal zero of both signs (then the caller asks torch.mode: which of equal values it returns is its
   sort's); those rows' out is not set. */
static int mode_row(const float *s, int64_t m, uint32_t *keys, int32_t *counts, int bits, float *out) {
    int64_t size = (int64_t)1 << bits;
    memset(counts, 0, size * sizeof(int32_t));
    int zero_signs = 0;
    for (int64_t i = 0; i < m; i++) {
        float v = s[i];
        if (v != v) return 1;
        uint32_t key;
        memcpy(&key, &v, 4);
        if (v == 0) {                 /* −0 and +0 are one value, as they are to torch.mode */
            zero_signs |= key ? 2 : 1;
            key = 0;
        }
        uint64_t h = ((uint64_t)key * 0x9E3779B97F4A7C15ull) >> (64 - bits);
        while (counts[h] && keys[h] != key) h = (h + 1) & (size - 1);
        keys[h] = key;
        counts[h]++;
    }
    int32_t best = 0;
    float value = 0;
    for (int64_t h = 0; h < size; h++) {
        if (!counts[h]) continue;
        float v;
        memcpy(&v, &keys[h], 4);
        if (counts[h] > best || (counts[h] == best && v < value)) {
            best = counts[h];
            value = v;
        }
    }
    if (value == 0 && zero_signs == 3) return 1;
    *out = value == 0 && zero_signs == 2 ? -0.0f : value;
    return 0;
}

int sfn_mode_rows(const float *s, int64_t rows, int64_t m, float *out, int parts) {
    int bits = 1;                     /* a table of at least 2m entries */
    while (((int64_t)1 << bits) < 2 * m) bits++;
    int64_t size = (int64_t)1 << bits;
    int64_t step = (rows + (int64_t)parts - 1) / (int64_t)parts;
    int odd = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(+:odd)
    for (int j = 0; j < parts; j++) {
        uint32_t *keys = malloc(size * sizeof(uint32_t));
        int32_t *counts = malloc(size * sizeof(int32_t));
        if (!keys || !counts) {
            odd += 1;
        } else {
            for (int64_t r = j * step; r < rows && r < (j + 1) * step; r++)
                odd += mode_row(s + r * m, m, keys, counts, bits, out + r);
        }
        free(keys);
        free(counts);
    }
    return odd;
}

/* the same over `parts` equal ranges (whole 64-byte lines), on OpenMP threads when built with it; part j
   counts into hist + j * bins */
void sfn_fire_parts(const float *x, int64_t n, int shift, const int32_t *base, const float *inner,
                    const float *values, float *out, int32_t *pos, int64_t *hist, int64_t bins, int parts) {
    int64_t step = (n + 16 * (int64_t)parts - 1) / (16 * (int64_t)parts) * 16;
    if (parts <= 1) {
        sfn_fire(x, n, shift, base, inner, values, out, pos, hist, bins);
        return;
    }
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int j = 0; j < parts; j++) {
        int64_t start = j * step, stop = start + step < n ? start + step : n;
        if (start < stop)
            sfn_fire(x + start, stop - start, shift, base, inner, values, out + start, pos ? pos + start : 0,
                     hist ? hist + j * bins : 0, bins);
    }
}
"""
_PART_MIN = 1 << 16         # elements per thread below which splitting costs more than it saves


def _parts(n: int, most: int | None = None) -> int:
    """How many threads share a call: as many as torch may use, each with at least _PART_MIN elements (and at
    most ``most``: parts split rows)."""
    return max(1, min(torch.get_num_threads(), n // _PART_MIN, n if most is None else most))


_NATIVE_MIN = 4096          # below this the torch operations are as fast (no call overhead to win back)
_native_lib: list = []      # [] not tried yet; [None] unavailable; [lib]


def _native_for(x: torch.Tensor):
    """The native library for a calibration kernel over ``x``: a CPU float32 tensor large enough to gain."""
    ok = x.numel() >= _NATIVE_MIN and x.device.type == "cpu" and x.dtype == torch.float32
    return native() if ok else None


def signed_counts(x: torch.Tensor, sp: float, sn: float, bins: int) -> torch.Tensor | None:
    """Calibration's 2·``bins`` signed histogram counts of a CPU float32 ``x`` in one native pass (positive
    values at scale ``sp``, negative ones at ``sn`` < 0; the counts of ``calibrate.update_signed``'s torch
    ops), or None: no native library, or a tensor too small or not float32 on the CPU."""
    lib = _native_for(x)
    if lib is None:
        return None
    x = x.contiguous()
    parts = _parts(x.numel())
    hist = torch.zeros(parts, 2 * bins, dtype=torch.int64)
    lib.sfn_hist_signed(x.data_ptr(), x.numel(), sp, sn, bins, hist.data_ptr(), parts)
    return hist.sum(0)


def count_equal(x: torch.Tensor, value: torch.Tensor, inner: int) -> torch.Tensor | None:
    """Per channel, how many entries of a CPU float32 ``x`` (outer × C × ``inner``) equal that channel's
    ``value`` (float, C), in one native pass without a boolean copy; None as :func:`signed_counts`."""
    lib = _native_for(x)
    if lib is None:
        return None
    x, value = x.contiguous(), value.to(torch.float32).contiguous()
    chans = value.numel()
    outer = x.numel() // (chans * inner)
    parts = _parts(x.numel(), outer)
    counts = torch.zeros(parts, chans, dtype=torch.int64)
    lib.sfn_count_equal(x.data_ptr(), outer, chans, inner, value.data_ptr(), counts.data_ptr(), parts)
    return counts.sum(0)


def mode_rows(s: torch.Tensor) -> torch.Tensor | None:
    """``s.mode(dim=1).values`` of a CPU float32 rows × m tensor by hashing (the same values; a sort costs more
    than the rest of calibration together), or None: as :func:`signed_counts`, or a row holds a NaN or a modal
    zero of both signs (which of equal values torch returns is its sort's)."""
    lib = _native_for(s) if s.dim() == 2 else None
    if lib is None:
        return None
    s = s.contiguous()
    out = torch.empty(s.shape[0], dtype=torch.float32)
    odd = lib.sfn_mode_rows(s.data_ptr(), s.shape[0], s.shape[1], out.data_ptr(), _parts(s.numel(), s.shape[0]))
    return None if odd else out


def native():
    """The compiled fused loop (ctypes), or None: no C compiler, a failed build, or SFN_NATIVE=0."""
    if os.environ.get("SFN_NATIVE", "1") == "0":
        return None
    if not _native_lib:
        _native_lib.append(_build())
    return _native_lib[0]


def cache_path(openmp: bool = True, simd: bool = True) -> str:
    """Where the compiled loop is kept (one file per version of its source, with and without OpenMP and the
    SIMD kernel)."""
    key = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    root = os.environ.get("SFN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sfn_deploy")
    return os.path.join(root, f"firegrid_{key}{'_omp' if openmp else ''}{'' if simd else '_scalar'}.so")


def _build():
    """The OpenMP build (its threads are torch's own when torch uses GNU OpenMP), else the serial one; each with
    the AVX2 kernel, else without it (a compiler that cannot build it)."""
    for openmp in (True, False):
        for simd in (True, False):
            flags = (["-fopenmp"] if openmp else []) + ([] if simd else ["-DSFN_SCALAR"])
            lib = _load(cache_path(openmp, simd), flags)
            if lib is not None:
                return lib
    return None


def _load(path: str, flags: list[str]):
    try:
        if not os.path.exists(path):
            cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
            if cc is None:
                return None
            root = os.path.dirname(path)
            os.makedirs(root, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:      # built aside, then moved in whole
                src = os.path.join(tmp, "firegrid.c")
                with open(src, "w") as f:
                    f.write(_SOURCE)
                so = os.path.join(tmp, "firegrid.so")
                subprocess.run([cc, "-O2", "-shared", "-fPIC", *flags, "-o", so, src], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
                os.replace(so, path)
        lib = ctypes.CDLL(path)
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.sfn_fire.argtypes = [p, i64, ctypes.c_int, p, p, p, p, p, p, i64]
        lib.sfn_fire.restype = None
        lib.sfn_fire_parts.argtypes = [p, i64, ctypes.c_int, p, p, p, p, p, p, i64, ctypes.c_int]
        lib.sfn_fire_parts.restype = None
        lib.sfn_hist_signed.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, i64, p, ctypes.c_int]
        lib.sfn_hist_signed.restype = None
        lib.sfn_count_equal.argtypes = [p, i64, i64, i64, p, p, ctypes.c_int]
        lib.sfn_count_equal.restype = None
        lib.sfn_mode_rows.argtypes = [p, i64, i64, p, ctypes.c_int]
        lib.sfn_mode_rows.restype = ctypes.c_int
        lib.sfn_spike_sums.argtypes = [p, i64, i64, p, p, p, p]
        lib.sfn_spike_sums.restype = None
        lib.sfn_simd.argtypes, lib.sfn_simd.restype = [ctypes.c_int], ctypes.c_int
        lib.sfn_simd(0 if os.environ.get("SFN_SIMD", "1") == "0" else 1)
        return lib
    except (OSError, subprocess.SubprocessError):
        return None
