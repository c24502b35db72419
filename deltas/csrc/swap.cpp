// The swap's CPU kernel (deltas/_kernel.py): one fused gather-and-write over every tensor of a
// delta, and the restore. Safety invariant: whatever it is given, it reads and writes only inside
// its buffers. Every index is checked against both bounds of its tensor and against the index
// before it, a chunk run on another thread trusts nothing its neighbour holds, and two chunks
// never write the same entry, so the undo after a bad index restores exactly what was written.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// Tuning knobs, each a -D flag so that bench/swap.py --variants can build and time alternatives
// side by side; the defaults are what measured best (docs/performance.md, section 1).
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
  if (j0 < lo || j0 > n - kRun || static_cast<int64_t>(idx[k + kRun - 1]) - j0 != kRun - 1) return false;
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

// Writes entries [k, stop) of one tensor (w: n entries may be written; prev: an index every entry
// must exceed, at least -1); returns stop, or the position of the first entry outside (prev, n) or
// not above the one before it, nothing at or after which was written.
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
    if (j < 0 || j >= n || j <= prev) return k;  // both bounds: prev may be -1 or anything above
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

// Where a thread chunk boundary falls inside a tensor (at entry k, 0 < k < nnz), the chunk
// before it may write only indices <= split and the chunk after it only indices > split, with
// split = idx[k - 1] clamped to [-1, n - 1]: whatever idx holds, the two write disjoint entries (a
// sound run: exactly its own), so undoing them in any order restores the base. No is -2.
template <typename I>
int64_t seam_split(const Segments& g, const I* idx, int64_t k) {
  const int64_t s = segment_of(g, k);
  if (k <= 0 || s >= g.count || (s > 0 && g.end[s - 1] == k)) return -2;  // a tensor starts at k
  const int64_t last = idx[k - 1];
  return std::clamp<int64_t>(last, -1, g.numel[s] - 1);
}

// Writes entries [lo, hi) (a chunk whose seams split its first and last tensor at `after` and
// `upto`, or -2); returns hi, or the position of the first entry it refused.
template <typename T, typename I>
int64_t apply_range(T* buf, const Segments& g, const I* idx, const T* inc, T* kept, int64_t lo,
                    int64_t hi, int64_t after, int64_t upto) {
  int64_t k = lo;
  for (int64_t s = segment_of(g, lo); k < hi; ++s) {
    T* w = buf + g.off[s];
    const int64_t stop = std::min(hi, g.end[s]);
    const int64_t n = stop == hi && upto != -2 ? upto + 1 : g.numel[s];
    const int64_t prev = k == lo && after != -2 ? after : -1;
    k = has_runs(idx, k, stop) ? apply_segment<true>(w, n, idx, inc, kept, k, stop, prev)
                               : apply_segment<false>(w, n, idx, inc, kept, k, stop, prev);
    if (k < stop) return k;
  }
  return k;
}

// The first entry that is outside its tensor or not above the one before it; nnz if none.
template <typename I>
int64_t first_bad(const Segments& g, const I* idx, int64_t nnz) {
  int64_t k = 0;
  for (int64_t s = 0; s < g.count; ++s) {
    int64_t prev = -1;
    for (; k < g.end[s]; ++k) {
      const int64_t j = idx[k];
      if (j < 0 || j >= g.numel[s] || j <= prev) return k;
      prev = j;
    }
  }
  return nnz;
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
  std::vector<int64_t> split(c + 1, -2);  // per seam, read before any chunk writes
  for (int64_t i = 1; i < c; ++i) split[i] = seam_split(g, idx, bounds[i]);
  std::vector<int64_t> reached(c);
  for_chunks(c, [&](int64_t i) {
    reached[i] = apply_range(buf, g, idx, inc, kept, bounds[i], bounds[i + 1], split[i], split[i + 1]);
  });
  bool sound = true;
  for (int64_t i = 0; i < c; ++i) sound &= reached[i] == bounds[i + 1];
  if (sound) return -1;  // every chunk in order within itself and across its seams (the splits)
  // undo every entry written, by any chunk (disjoint entries: the order does not matter), then
  // name the first bad entry as one pass over the whole run would
  for (int64_t i = c - 1; i >= 0; --i) restore_range(buf, g, idx, kept, bounds[i], reached[i]);
  return first_bad(g, idx, nnz);
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
  int64_t before = 0, used = 0;  // entries of the run, entries of the buffer covered so far
  for (int64_t s = 0; s < count; ++s) {  // segments inside the buffer, in its order, not
    // overlapping (two writes of one weight could not both be undone); the run covered in order
    TORCH_CHECK(g.off[s] >= 0 && g.numel[s] >= 0 && g.off[s] <= buf.numel() &&
                g.numel[s] <= buf.numel() - g.off[s], "segment ", s, " lies outside the buffer");
    TORCH_CHECK(g.off[s] >= used, "segment ", s, " overlaps the one before it");
    TORCH_CHECK(g.end[s] >= before, "segment ends out of order");
    before = g.end[s];
    used = g.off[s] + g.numel[s];
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "keep and write a packed delta's entries; -1, or the first bad entry");
  m.def("restore", &restore, "write the kept values back");
}
