"""The swap's CPU kernel: one fused gather-and-write over every tensor of a delta, in C++.

A delta is packed (see `swap.Packed`) per weight buffer (see `layout.py`) as one run of local
indices, one run of increments and a [3, segments] table: each segment is one base tensor, its
offset in the buffer, its size and where its entries end in the run. `apply` walks the run once:
for every entry it checks the index (inside its tensor, above the one before it), keeps the weight
and writes `weight + increment` computed in the weight's dtype as torch computes it (through float
for the 16-bit types, rounded to nearest even), prefetching the weight's line for writing 64
entries ahead. In a tensor whose mask is structured (sampled: runs of consecutive indices), 16
consecutive indices are checked together and written as one block. At a bad index it undoes
everything it wrote and returns the position, so the base is as it was. `restore` writes the kept
values back, last entry first. Long runs are split over torch's threads.

Where the time goes: a mask spread at random over the weights puts nearly every entry of a
<= 5 % delta in a 64-byte line of its own, and memory moves whole lines, so a swap moves 6-13x the
bytes it uses (bench/swap.py's `lines/B` column) and cannot come near a copy of the useful bytes
alone; a block-structured mask uses the lines it touches whole and can.

Measured alternatives (bench/swap.py --variants: builds of this source with other -D knobs, same
process, interleaved in rotating order, 1 thread, on a shared and busy 2-core AMD EPYC; medians):
the block path, 15-40 % faster on a mask of 64-entry blocks (most in bf16); looking for runs in
every tensor cost random masks up to a third, so it is only done where sampling finds them;
PREFETCHW rather than a non-temporal prefetch hint, 0-5 % faster (within noise); prefetching 0,
8, 16, 32 or 128 entries ahead, the temporal hint, int64 indices, non-temporal stores of the kept
values and restoring front to back, all within noise of the defaults; no prefetch in restore,
faster where apply has just left the lines in cache (as when the bench swaps back to back) but
slower on the largest delta, whose lines have left the caches before restore (as in the server,
where a forward pass runs between apply and restore). Earlier, on a Xeon: checking every index in
a separate vectorised pass first was 5-25 % slower (the checks in the loop cost nothing next to the
cache misses), and restoring front to back was slower.

Built once with `torch.utils.cpp_extension.load_inline` (a C++ compiler and `ninja`) into
`$TASKDELTA_CACHE_DIR/kernels/`, keyed by the source and the torch and Python versions, so later
processes only load it. Where it cannot be built, `load()` logs a warning once and returns None,
and the swap uses torch index ops instead: the same results, several times slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from types import ModuleType

import torch

from .paths import cache_dir

log = logging.getLogger("taskdelta.swap")
DISABLE_ENV = "TASKDELTA_SWAP_KERNEL"  # "0" turns the kernel off (the torch path is used)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// Tuning knobs, each a -D flag so that bench/swap.py --variants can build and time alternatives
// side by side; the defaults are what measured best (see the module docstring).
#ifndef TD_AHEAD
#define TD_AHEAD 64  // prefetch the weight this many entries ahead (0: no prefetch)
#endif
#ifndef TD_RESTORE_AHEAD
#define TD_RESTORE_AHEAD TD_AHEAD
#endif
#ifndef TD_LOCALITY
#define TD_LOCALITY 0  // __builtin_prefetch's hint: 0 non-temporal .. 3 keep in every cache
#endif
#ifndef TD_PREFETCHW
#define TD_PREFETCHW 1  // x86 PREFETCHW (fetch the line to write it), not the hint above
#endif
#ifndef TD_RUN
#define TD_RUN 16  // a run of this many consecutive indices is written as one block (0: off)
#endif
#ifndef TD_GRAIN
#define TD_GRAIN (1 << 16)
#endif

constexpr int64_t kAhead = TD_AHEAD;
constexpr int64_t kRestoreAhead = TD_RESTORE_AHEAD;
constexpr int64_t kRun = TD_RUN;
constexpr int64_t kGrain = TD_GRAIN;  // fewer entries than this per thread: not worth a thread

template <typename T>
inline void prefetch_write(const T* p) {
#if TD_PREFETCHW && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetchw %0" : : "m"(*reinterpret_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, TD_LOCALITY);
#endif
}

template <typename T>
inline T add_in_dtype(T w, T d) {
  // torch's add for 16-bit floats: through float, rounded to nearest even
  return static_cast<T>(static_cast<float>(w) + static_cast<float>(d));
}
template <> inline float add_in_dtype<float>(float w, float d) { return w + d; }
template <> inline double add_in_dtype<double>(double w, double d) { return w + d; }

// A delta's entries for one buffer: segment s covers run[end[s-1] : end[s]] and holds local
// indices into buf[off[s] : off[s] + numel[s]].
struct Segments {
  const int64_t* off;
  const int64_t* numel;
  const int64_t* end;
  int64_t count;
};

inline int64_t segment_of(const Segments& g, int64_t k) {
  return std::upper_bound(g.end, g.end + g.count, k) - g.end;
}

// True where idx[k, k + kRun) are the consecutive indices j0, j0 + 1, ... inside [lo, n): a run
// written as one block (every index in it is then sound: increasing and in range).
template <typename I>
inline bool is_run(const I* idx, int64_t k, int64_t lo, int64_t n) {
  const int64_t j0 = idx[k];
  if (j0 < lo || j0 + kRun > n || static_cast<int64_t>(idx[k + kRun - 1]) - j0 != kRun - 1) return false;
  bool run = true;
  for (int64_t i = 1; i < kRun - 1; ++i) run &= static_cast<int64_t>(idx[k + i]) == j0 + i;
  return run;
}

// Whether entries [lo, hi) of one tensor look structured: at least a quarter of up to 64 evenly
// spaced samples start a run. Only then does the loop look for runs; a random mask's loop stays
// the plain entry-wise one (looking costs it up to a third more where consecutive pairs are common).
template <typename I>
bool has_runs(const I* idx, int64_t lo, int64_t hi) {
  if (kRun == 0 || hi - lo < 4 * kRun) return false;
  const int64_t samples = std::min<int64_t>(64, (hi - lo) / kRun);
  int64_t found = 0;
  for (int64_t i = 0; i < samples; ++i) {
    const int64_t k = lo + (hi - lo - kRun) * i / samples;
    found += static_cast<int64_t>(idx[k + kRun - 1]) - static_cast<int64_t>(idx[k]) == kRun - 1;
  }
  return 4 * found >= samples;
}

// Writes entries [k, stop) of one tensor (w, n entries; prev: the index before k, or -1); returns
// stop, or the position of the first bad index (out of the tensor or not above the one before it),
// nothing at or after which was written.
template <bool Runs, typename T, typename I>
int64_t apply_segment(T* w, int64_t n, const I* idx, const T* inc, T* kept, int64_t k, int64_t stop,
                      int64_t prev) {
  bool try_run = false;  // after two consecutive indices: look for a run
  while (k < stop) {
    if (Runs && try_run) {
      if (k + kRun <= stop && is_run(idx, k, prev + 1, n)) {
        const int64_t j0 = idx[k];
        if (kAhead > 0 && k + kAhead + kRun <= stop) {
          for (int64_t i = 0; i < kRun; i += 64 / sizeof(T)) {
            const int64_t a = idx[k + kAhead + i];
            if (a >= 0 && a < n) prefetch_write(w + a);
          }
        }
        for (int64_t i = 0; i < kRun; ++i) {
          const T v = w[j0 + i];
          kept[k + i] = v;
          w[j0 + i] = add_in_dtype(v, inc[k + i]);
        }
        prev = j0 + kRun - 1;
        k += kRun;
        continue;
      }
      try_run = false;
    }
    const int64_t j = idx[k];
    if (j <= prev || j >= n) return k;
    if (kAhead > 0 && k + kAhead < stop) {
      const int64_t a = idx[k + kAhead];
      if (a >= 0 && a < n) prefetch_write(w + a);
    }
    const T v = w[j];
    kept[k] = v;
    w[j] = add_in_dtype(v, inc[k]);
    if (Runs) try_run = j == prev + 1;
    prev = j;
    ++k;
  }
  return k;
}

// Writes entries [lo, hi); returns hi, or the position of the first bad index.
template <typename T, typename I>
int64_t apply_range(T* buf, const Segments& g, const I* idx, const T* inc, T* kept, int64_t lo,
                    int64_t hi) {
  int64_t k = lo;
  for (int64_t s = segment_of(g, lo); k < hi; ++s) {
    T* w = buf + g.off[s];
    const int64_t n = g.numel[s];
    const int64_t start = s == 0 ? 0 : g.end[s - 1];
    const int64_t stop = std::min(hi, g.end[s]);
    const int64_t prev = k > start ? static_cast<int64_t>(idx[k - 1]) : -1;
    k = has_runs(idx, k, stop) ? apply_segment<true>(w, n, idx, inc, kept, k, stop, prev)
                               : apply_segment<false>(w, n, idx, inc, kept, k, stop, prev);
    if (k < stop) return k;
  }
  return k;
}

// Writes kept values back over entries [start, k] of one tensor, last entry first. An index out of
// the tensor is skipped (it can only be one edited since apply).
template <bool Runs, typename T, typename I>
void restore_segment(T* w, int64_t n, const I* idx, const T* kept, int64_t start, int64_t k) {
  int64_t last = -2;  // the index written just before (the next one in a run)
  while (k >= start) {
    if (Runs && last > 0 && static_cast<int64_t>(idx[k]) == last - 1) {
      if (k - kRun + 1 >= start && is_run(idx, k - kRun + 1, 0, n)) {
        std::memcpy(w + idx[k - kRun + 1], kept + k - kRun + 1, kRun * sizeof(T));
        last = idx[k - kRun + 1];
        k -= kRun;
        continue;
      }
    }
    if (kRestoreAhead > 0 && k - kRestoreAhead >= start) {
      const int64_t a = idx[k - kRestoreAhead];
      if (a >= 0 && a < n) prefetch_write(w + a);
    }
    const int64_t j = idx[k];
    if (j >= 0 && j < n) w[j] = kept[k];
    last = j;
    --k;
  }
}

// Writes kept values back over [lo, hi), last entry first: walking back over the entries just
// written finds the most recent ones still in cache.
template <typename T, typename I>
void restore_range(T* buf, const Segments& g, const I* idx, const T* kept, int64_t lo, int64_t hi) {
  if (hi <= lo) return;
  int64_t k = hi - 1;
  for (int64_t s = segment_of(g, k); k >= lo; --s) {
    T* w = buf + g.off[s];
    const int64_t n = g.numel[s];
    const int64_t start = std::max(lo, s == 0 ? int64_t(0) : g.end[s - 1]);
    if (has_runs(idx, start, k + 1))
      restore_segment<true>(w, n, idx, kept, start, k);
    else
      restore_segment<false>(w, n, idx, kept, start, k);
    k = start - 1;
  }
}

std::vector<int64_t> chunk_bounds(int64_t nnz, int64_t threads) {
  const int64_t c = std::max<int64_t>(1, std::min<int64_t>(threads, nnz / kGrain));
  std::vector<int64_t> bounds(c + 1);
  for (int64_t i = 0; i <= c; ++i) bounds[i] = nnz * i / c;
  return bounds;
}

template <typename F>
void for_chunks(int64_t c, const F& f) {
  if (c == 1) { f(0); return; }
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) { for (int64_t i = b; i < e; ++i) f(i); });
}

template <typename T, typename I>
int64_t apply_typed(T* buf, const Segments& g, const I* idx, const T* inc, T* kept, int64_t nnz,
                    int64_t threads) {
  const auto bounds = chunk_bounds(nnz, threads);
  const int64_t c = bounds.size() - 1;
  std::vector<int64_t> reached(c);
  for_chunks(c, [&](int64_t i) {
    reached[i] = apply_range(buf, g, idx, inc, kept, bounds[i], bounds[i + 1]);
  });
  int64_t bad = -1;
  for (int64_t i = 0; i < c && bad < 0; ++i)
    if (reached[i] != bounds[i + 1]) bad = reached[i];
  for (int64_t i = 1; i < c && bad < 0; ++i) {  // a chunk checked the order within itself only
    const int64_t k = bounds[i];
    if (segment_of(g, k) == segment_of(g, k - 1) && idx[k] <= idx[k - 1]) bad = k;
  }
  if (bad >= 0)  // undo every entry written, by any chunk, last first
    for (int64_t i = c - 1; i >= 0; --i) restore_range(buf, g, idx, kept, bounds[i], reached[i]);
  return bad;
}

template <typename T, typename I>
void restore_typed(T* buf, const Segments& g, const I* idx, const T* kept, int64_t nnz, int64_t threads) {
  const auto bounds = chunk_bounds(nnz, threads);
  for_chunks(bounds.size() - 1, [&](int64_t i) {
    restore_range(buf, g, idx, kept, bounds[i], bounds[i + 1]);
  });
}

Segments checked_segments(const at::Tensor& buf, const at::Tensor& segs, const at::Tensor& idx,
                          const at::Tensor& vals, const at::Tensor& kept) {
  TORCH_CHECK(buf.device().is_cpu() && segs.device().is_cpu() && idx.device().is_cpu() &&
              vals.device().is_cpu() && kept.device().is_cpu(), "the swap kernel runs on CPU tensors");
  TORCH_CHECK(buf.dim() == 1 && buf.is_contiguous() && idx.is_contiguous() && vals.is_contiguous() &&
              kept.is_contiguous() && segs.is_contiguous(), "tensors must be contiguous");
  TORCH_CHECK(segs.scalar_type() == at::kLong && segs.dim() == 2 && segs.size(0) == 3,
              "segments must be int64 [3, count]");
  TORCH_CHECK(vals.scalar_type() == buf.scalar_type() && kept.scalar_type() == buf.scalar_type(),
              "values, kept values and buffer must share a dtype");
  TORCH_CHECK(idx.dim() == 1 && vals.numel() == idx.numel() && kept.numel() >= idx.numel(),
              "indices, values and kept values differ in length");
  const int64_t count = segs.size(1);
  const int64_t* p = segs.data_ptr<int64_t>();
  Segments g{p, p + count, p + 2 * count, count};
  int64_t before = 0;
  for (int64_t s = 0; s < count; ++s) {  // every segment inside the buffer, the run covered in order
    TORCH_CHECK(g.off[s] >= 0 && g.numel[s] >= 0 && g.off[s] + g.numel[s] <= buf.numel(),
                "segment ", s, " lies outside the buffer");
    TORCH_CHECK(g.end[s] >= before, "segment ends out of order");
    before = g.end[s];
  }
  TORCH_CHECK(before == idx.numel(), "segments do not cover the indices");
  return g;
}

#define TD_DISPATCH(IDX, DT, CALL)                                                        \
  [&] {                                                                                    \
    TORCH_CHECK(IDX.scalar_type() == at::kInt || IDX.scalar_type() == at::kLong,           \
                "indices must be int32 or int64");                                         \
    const bool i32 = IDX.scalar_type() == at::kInt;                                        \
    switch (DT) {                                                                          \
      case at::kFloat: { using T = float; return i32 ? CALL(int32_t) : CALL(int64_t); }    \
      case at::kBFloat16: { using T = c10::BFloat16; return i32 ? CALL(int32_t) : CALL(int64_t); } \
      case at::kHalf: { using T = c10::Half; return i32 ? CALL(int32_t) : CALL(int64_t); } \
      case at::kDouble: { using T = double; return i32 ? CALL(int32_t) : CALL(int64_t); }  \
      default: TORCH_CHECK(false, "the swap kernel does not handle ", DT);                 \
    }                                                                                      \
  }()

}  // namespace

// Returns -1, or the position of the first bad index (then nothing is left written).
int64_t apply(at::Tensor buf, at::Tensor segs, at::Tensor idx, at::Tensor inc, at::Tensor kept,
              int64_t threads) {
  const Segments g = checked_segments(buf, segs, idx, inc, kept);
  const int64_t nnz = idx.numel();
  if (nnz == 0) return -1;
  pybind11::gil_scoped_release no_gil;  // the server's event loop runs on while the weights change
#define TD_APPLY(I) apply_typed<T, I>(buf.data_ptr<T>(), g, idx.data_ptr<I>(), inc.data_ptr<T>(), \
                                      kept.data_ptr<T>(), nnz, threads)
  return TD_DISPATCH(idx, buf.scalar_type(), TD_APPLY);
}

void restore(at::Tensor buf, at::Tensor segs, at::Tensor idx, at::Tensor kept, int64_t threads) {
  const Segments g = checked_segments(buf, segs, idx, kept, kept);
  const int64_t nnz = idx.numel();
  if (nnz == 0) return;
  pybind11::gil_scoped_release no_gil;
#define TD_RESTORE(I) restore_typed<T, I>(buf.data_ptr<T>(), g, idx.data_ptr<I>(), kept.data_ptr<T>(), \
                                          nnz, threads)
  TD_DISPATCH(idx, buf.scalar_type(), TD_RESTORE);
}
"""

_FUNCTIONS = ["apply", "restore"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_variants: dict[tuple[str, ...], ModuleType | None] = {}


def _key(flags: tuple[str, ...] = ()) -> str:
    parts = [SOURCE, *flags, torch.__version__, sys.version, platform.machine()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_dir(flags: tuple[str, ...] = ()) -> str:
    return str(cache_dir() / "kernels" / f"swap-{_key(flags)}")


def load() -> ModuleType | None:
    """The compiled kernel module, built on first use; None (warned once) where it cannot be."""
    with _lock:
        if "module" not in _state:
            if os.environ.get(DISABLE_ENV, "1") == "0":
                log.info("swap kernel disabled by %s=0: using torch index ops", DISABLE_ENV)
                _state["module"] = None
            else:
                _state["module"] = _build()
        return _state["module"]


def variant(**defines: int) -> ModuleType | None:
    """The kernel built with other tuning knobs (`variant(TD_AHEAD=16)`): for bench/swap.py to
    time alternatives against the default in one process."""
    flags = tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
    with _lock:
        if flags not in _variants:
            _variants[flags] = _build(flags)
        return _variants[flags]


def _build(flags: tuple[str, ...] = ()) -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load_inline

        folder = build_dir(flags)
        os.makedirs(folder, exist_ok=True)
        return load_inline(name=f"taskdelta_swap_{_key(flags)}", cpp_sources=[SOURCE],
                           functions=_FUNCTIONS, extra_cflags=["-O3", *flags], build_directory=folder,
                           verbose=False)
    except Exception as exc:  # no compiler, no ninja, no headers, a read-only cache: all the same
        log.warning("cannot build the swap kernel (%s: %s); swapping with torch index ops instead, "
                    "which is correct but several times slower", type(exc).__name__,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return None


def reset() -> None:
    """Forget the loaded kernel (tests: to exercise the fallback and the build again)."""
    with _lock:
        _state.clear()
        _variants.clear()
