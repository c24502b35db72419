"""The mixed batch's CPU kernels (`mixed.py`): several tasks' sparse corrections in one call.

All read a delta as it is kept for the swap (sorted flat indices local to the tensor and the
increments), so mixed batches cost no memory beyond it. One call per module serves every task of
the batch, each on its rows (runs of batch rows, `per_row` tokens each).

`linear_fix` adds x @ ΔWᵀ to y for each task's rows, up to 64 of them at a time (one pass):
it transposes the pass's rows into xt [in, rows rounded up to 8] (8 x 8 register blocks) and
walks ΔW's entries once. ΔW [out, in] has row-major sorted flat indices, so each output column's
entries follow one another, and every entry adds `val * xt[col]` to that column's sums, kept in
registers (8 rows a vector, two chains so that consecutive entries do not wait on each other).
The sums of 64 columns at a time go to yt [64, rows] (one store a vector) and are added to y
transposed back, in 8 x 8 blocks; xt and yt stay in cache. Where the old kernel took 16 rows a
pass and 16 scalar stores a column, a text of 18 tokens now costs one pass of 24 rows. Entries
out of place (below their column's first index or past the matrix) are skipped, never read out
of bounds: a cold load that trusted a stamp checked no index. `embedding_fix` adds ΔE's row of
each token id to y (two binary searches per token). `rows_fix` adds each task's LayerNorm
(norm(x) * Δγ + Δβ) or bias rows.

float32 only; built once with `torch.utils.cpp_extension.load_inline` into
`$TASKDELTA_CACHE_DIR/kernels/`. Where it cannot be built, `load()` logs once and returns None and
`mixed.py` uses torch sparse ops: the same sums up to rounding, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from types import ModuleType

import torch

from .paths import cache_dir

log = logging.getLogger("taskdelta.mixed")
DISABLE_ENV = "TASKDELTA_MIXED_KERNEL"  # "0": torch sparse ops instead

SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <numeric>
#include <vector>
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {
constexpr int64_t L = 8;      // floats per vector (one AVX2 register): a pass's rows round up to 8
constexpr int64_t VMAX = 8;   // vectors per pass: up to 64 rows share one read of the entries
constexpr int64_t OB = 64;    // output columns whose sums are added to y at a time
typedef float vec __attribute__((vector_size(32)));

inline vec load(const float* p) { vec v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec v) { __builtin_memcpy(p, &v, sizeof v); }

// dst[c * ldd + t] (+)= src[t * lds + c] for t, c < 8
template <bool ADD>
inline void block8(const float* src, int64_t lds, float* dst, int64_t ldd) {
#ifdef __AVX__
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds),
         r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds),
         r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds),
         r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
         t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
         t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
         s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
         s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
         s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  __m256 c[8] = {_mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
                 _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
                 _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
                 _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
  for (int k = 0; k < 8; ++k) {
    float* d = dst + k * ldd;
    _mm256_storeu_ps(d, ADD ? _mm256_add_ps(_mm256_loadu_ps(d), c[k]) : c[k]);
  }
#else
  for (int t = 0; t < 8; ++t)
    for (int c = 0; c < 8; ++c) {
      float& d = dst[c * ldd + t];
      d = ADD ? d + src[t * lds + c] : src[t * lds + c];
    }
#endif
}

// dst[c * ldd + t] (+)= src[t * lds + c] for t < rows, c < cols: 8 x 8 blocks, then the edges
template <bool ADD>
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t t = 0; t < r8; t += 8)
    for (int64_t c = 0; c < c8; c += 8) block8<ADD>(src + t * lds + c, lds, dst + c * ldd + t, ldd);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = t < r8 ? c8 : 0; c < cols; ++c) {
      float& d = dst[c * ldd + t];
      d = ADD ? d + src[t * lds + c] : src[t * lds + c];
    }
}

// y[rows] += x[rows] @ dW^T for n <= V * L rows, xt [in, V * L] holding them transposed (the
// columns past n: any finite values, their sums are dropped). dW [out, in] is given by its sorted
// row-major flat indices: each output column's entries follow one another. An index out of place
// (below its column's first, or past the matrix) is skipped.
template <int V, typename I>
void pass(const float* __restrict__ xt, float* __restrict__ yt, float* __restrict__ y, int64_t n,
          int64_t in, int64_t out, const I* __restrict__ idx, const float* __restrict__ val,
          int64_t nnz) {
  constexpr int64_t W = V * L;
  int64_t k = 0;
  for (int64_t o0 = 0; o0 < out; o0 += OB) {
    const int64_t ob = std::min(OB, out - o0);
    for (int64_t o = o0; o < o0 + ob; ++o) {  // yt [ob, W]: these columns' sums
      const int64_t first = o * in, end = first + in;
      int64_t e = k;
      while (e < nnz && static_cast<int64_t>(idx[e]) < end) ++e;
      vec acc0[V], acc1[V];  // two chains: consecutive entries do not wait on each other
      for (int v = 0; v < V; ++v) acc0[v] = acc1[v] = vec{};
      int64_t q = k;
      for (; q + 1 < e; q += 2) {
        const int64_t c0 = static_cast<int64_t>(idx[q]) - first;
        const int64_t c1 = static_cast<int64_t>(idx[q + 1]) - first;
        if (c0 >= 0) {
          const float w = val[q];
          for (int v = 0; v < V; ++v) acc0[v] += w * load(xt + c0 * W + v * L);
        }
        if (c1 >= 0) {
          const float w = val[q + 1];
          for (int v = 0; v < V; ++v) acc1[v] += w * load(xt + c1 * W + v * L);
        }
      }
      if (q < e) {
        const int64_t c0 = static_cast<int64_t>(idx[q]) - first;
        if (c0 >= 0) {
          const float w = val[q];
          for (int v = 0; v < V; ++v) acc0[v] += w * load(xt + c0 * W + v * L);
        }
      }
      k = e;
      for (int v = 0; v < V; ++v) store(yt + (o - o0) * W + v * L, acc0[v] + acc1[v]);
    }
    transpose<true>(yt, W, y + o0, out, ob, n);  // y[t, o0 + o] += yt[o, t]
  }
}

template <typename I>
void run_pass(int64_t vectors, const float* xt, float* yt, float* y, int64_t n, int64_t in,
              int64_t out, const I* idx, const float* val, int64_t nnz) {
  switch (vectors) {
    case 1: pass<1>(xt, yt, y, n, in, out, idx, val, nnz); break;
    case 2: pass<2>(xt, yt, y, n, in, out, idx, val, nnz); break;
    case 3: pass<3>(xt, yt, y, n, in, out, idx, val, nnz); break;
    case 4: pass<4>(xt, yt, y, n, in, out, idx, val, nnz); break;
    case 5: pass<5>(xt, yt, y, n, in, out, idx, val, nnz); break;
    case 6: pass<6>(xt, yt, y, n, in, out, idx, val, nnz); break;
    case 7: pass<7>(xt, yt, y, n, in, out, idx, val, nnz); break;
    default: pass<8>(xt, yt, y, n, in, out, idx, val, nnz); break;
  }
}

// y[r] += dE[ids[r]] for r in [r0, r1), dE [vocab, hidden] given by sorted flat indices
template <typename I>
void embedding_rows(const int64_t* ids, float* y, int64_t hidden, int64_t vocab, int64_t r0,
                    int64_t r1, const I* idx, const float* val, int64_t nnz) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t id = ids[r];
    TORCH_CHECK(0 <= id && id < vocab, "id ", id, " out of range");
    const int64_t first = id * hidden;
    const I* lo = std::lower_bound(idx, idx + nnz, static_cast<I>(first));
    const I* hi = std::lower_bound(lo, idx + nnz, static_cast<I>(first + hidden));
    for (const I* p = lo; p < hi; ++p) y[r * hidden + (*p - first)] += val[p - idx];
  }
}

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, " must be a contiguous CPU tensor");
}

void check_run(const torch::Tensor& idx, const torch::Tensor& val, int64_t numel) {
  check(idx, "idx"); check(val, "val");
  TORCH_CHECK(val.scalar_type() == torch::kFloat && idx.numel() == val.numel() &&
              (idx.scalar_type() == torch::kInt || idx.scalar_type() == torch::kLong),
              "idx int32/int64 and float32 val of one length");
  TORCH_CHECK(idx.numel() == 0 || idx.scalar_type() == torch::kLong ||
              numel <= INT32_MAX, "int32 indices into a tensor of 2^31+ entries");
}

// the segments' rows, in tokens: [per_row * starts[s], per_row * ends[s]), checked
void token_rows(std::vector<int64_t>& starts, std::vector<int64_t>& ends, int64_t per_row,
                int64_t rows, size_t count) {
  TORCH_CHECK(starts.size() == count && ends.size() == count && per_row > 0, "one range a run");
  for (size_t s = 0; s < count; ++s) {
    starts[s] *= per_row; ends[s] *= per_row;
    TORCH_CHECK(0 <= starts[s] && starts[s] <= ends[s] && ends[s] <= rows, "rows out of range");
  }
}
}  // namespace

// y[rows of run s] += x[rows of run s] @ dW_s^T for every run; runs' rows are batch rows of
// per_row tokens each, in order and not overlapping
void linear_fix(torch::Tensor x, torch::Tensor y, int64_t per_row, std::vector<torch::Tensor> idxs,
                std::vector<torch::Tensor> vals, std::vector<int64_t> starts,
                std::vector<int64_t> ends) {
  check(x, "x"); check(y, "y");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x [rows, in], y [rows, out]");
  const int64_t in = x.size(1), out = y.size(1), rows = x.size(0);
  token_rows(starts, ends, per_row, rows, idxs.size());
  TORCH_CHECK(vals.size() == idxs.size(), "one val a run");
  for (size_t s = 0; s < idxs.size(); ++s) {
    check_run(idxs[s], vals[s], in * out);
    TORCH_CHECK(s == 0 || ends[s - 1] <= starts[s], "runs in order, not overlapping");
  }
  // per pass (up to VMAX * L rows of one run): xt [in, W] its rows transposed, yt [OB, W] the
  // sums of OB output columns; both stay in cache (the columns of xt past the pass's rows hold
  // what an earlier pass left there: finite, and their sums are never added)
  thread_local std::vector<float> xt_buf, yt_buf;
  if (static_cast<int64_t>(xt_buf.size()) < in * VMAX * L) xt_buf.resize(in * VMAX * L);
  if (static_cast<int64_t>(yt_buf.size()) < OB * VMAX * L) yt_buf.resize(OB * VMAX * L);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (size_t s = 0; s < idxs.size(); ++s) {
    for (int64_t a = starts[s]; a < ends[s]; a += VMAX * L) {
      const int64_t n = std::min(VMAX * L, ends[s] - a), vectors = (n + L - 1) / L;
      transpose<false>(xp + a * in, in, xt_buf.data(), vectors * L, n, in);
      if (idxs[s].scalar_type() == torch::kInt) {
        run_pass(vectors, xt_buf.data(), yt_buf.data(), yp + a * out, n, in, out,
                 idxs[s].data_ptr<int32_t>(), vals[s].data_ptr<float>(), idxs[s].numel());
      } else {
        run_pass(vectors, xt_buf.data(), yt_buf.data(), yp + a * out, n, in, out,
                 idxs[s].data_ptr<int64_t>(), vals[s].data_ptr<float>(), idxs[s].numel());
      }
    }
  }
}

void embedding_fix(torch::Tensor ids, torch::Tensor y, int64_t vocab, int64_t per_row,
                   std::vector<torch::Tensor> idxs, std::vector<torch::Tensor> vals,
                   std::vector<int64_t> starts, std::vector<int64_t> ends) {
  check(ids, "ids"); check(y, "y");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && y.scalar_type() == torch::kFloat, "dtypes");
  TORCH_CHECK(y.dim() == 2 && ids.numel() == y.size(0), "ids [rows], y [rows, hidden]");
  const int64_t hidden = y.size(1), rows = y.size(0);
  token_rows(starts, ends, per_row, rows, idxs.size());
  TORCH_CHECK(vals.size() == idxs.size(), "one val a run");
  for (size_t s = 0; s < idxs.size(); ++s) {
    check_run(idxs[s], vals[s], vocab * hidden);
    if (idxs[s].scalar_type() == torch::kInt) {
      embedding_rows(ids.data_ptr<int64_t>(), y.data_ptr<float>(), hidden, vocab, starts[s],
                     ends[s], idxs[s].data_ptr<int32_t>(), vals[s].data_ptr<float>(),
                     idxs[s].numel());
    } else {
      embedding_rows(ids.data_ptr<int64_t>(), y.data_ptr<float>(), hidden, vocab, starts[s],
                     ends[s], idxs[s].data_ptr<int64_t>(), vals[s].data_ptr<float>(),
                     idxs[s].numel());
    }
  }
}

// y[t] = (y[t] + scale[t] * gammas[s]) + betas[s] for the rows t of run s; an empty gamma or
// beta is left out (scale: empty where no run has a gamma)
void rows_fix(torch::Tensor y, torch::Tensor scale, int64_t per_row,
              std::vector<torch::Tensor> gammas, std::vector<torch::Tensor> betas,
              std::vector<int64_t> starts, std::vector<int64_t> ends) {
  check(y, "y");
  TORCH_CHECK(y.scalar_type() == torch::kFloat && y.dim() == 2, "y [rows, size] float32");
  const int64_t size = y.size(1), rows = y.size(0);
  token_rows(starts, ends, per_row, rows, gammas.size());
  TORCH_CHECK(betas.size() == gammas.size(), "one beta a run");
  float* yp = y.data_ptr<float>();
  for (size_t s = 0; s < gammas.size(); ++s) {
    const torch::Tensor& g = gammas[s];
    const torch::Tensor& b = betas[s];
    for (const torch::Tensor* t : {&g, &b}) {
      if (t->numel() == 0) continue;
      check(*t, "gamma / beta");
      TORCH_CHECK(t->scalar_type() == torch::kFloat && t->numel() == size, "[size] float32");
    }
    const float* gp = g.numel() ? g.data_ptr<float>() : nullptr;
    const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
    const float* sp = nullptr;
    if (gp != nullptr) {
      check(scale, "scale");
      TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.sizes() == y.sizes(),
                  "scale like y");
      sp = scale.data_ptr<float>();
    }
    for (int64_t t = starts[s]; t < ends[s]; ++t) {
      float* yr = yp + t * size;
      if (gp != nullptr) {
        const float* sr = sp + t * size;
        for (int64_t i = 0; i < size; ++i) yr[i] += sr[i] * gp[i];
      }
      if (bp != nullptr)
        for (int64_t i = 0; i < size; ++i) yr[i] += bp[i];
    }
  }
}
"""

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def load() -> ModuleType | None:
    """The compiled kernels, built on first use; None (logged once) where they cannot be."""
    with _lock:
        if "module" not in _state:
            if os.environ.get(DISABLE_ENV, "1") == "0":
                _state["module"] = None
            else:
                _state["module"] = _build()
        return _state["module"]


def _flags() -> list[str]:
    """-O3, plus AVX2 and FMA where torch found them on this CPU (the build runs where it serves;
    the flags are part of the build's key, so a shared cache folder never mixes them). 8-row
    vectors waste less of a pass than AVX-512's 16 (a text of 18 tokens: 24 rows, not 32)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return ["-O3", "-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else ["-O3"]


def _build() -> ModuleType | None:
    flags = _flags()
    key = hashlib.sha256(f"{SOURCE}{flags}{torch.__version__}{sys.version}".encode()).hexdigest()[:16]
    try:
        from torch.utils.cpp_extension import load_inline

        folder = cache_dir() / "kernels" / f"mixed-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        return load_inline(name=f"taskdelta_mixed_{key}", cpp_sources=[SOURCE],
                           functions=["linear_fix", "embedding_fix", "rows_fix"], extra_cflags=flags,
                           build_directory=str(folder), verbose=False)
    except Exception as exc:  # no compiler, no ninja, no headers, a read-only cache: all the same
        log.warning("cannot build the mixed-batch kernels (%s); using torch sparse ops instead",
                    type(exc).__name__)
        return None


def reset() -> None:
    """Forget the loaded kernels (tests: to exercise the fallback)."""
    with _lock:
        _state.clear()
