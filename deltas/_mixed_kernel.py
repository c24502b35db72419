"""The mixed batch's CPU kernels (`mixed.py`): several tasks' sparse corrections in one call.

Both read a delta as it is kept for the swap (sorted flat indices local to the tensor and the
increments), so mixed batches cost no memory beyond it. `linear_fix` adds x @ ΔWᵀ to y for each
task's rows; ΔW [out, in] has row-major sorted flat indices, so each output column's entries
follow one another and a comparison finds where they end. It takes the rows 16 at a time,
transposes them into a small [in, 16] buffer, and for every stored entry adds `val * x[:, col]` to
the 16 sums of its output column (vectorised by the compiler); the sums of 64 columns at a time
are kept row-major and added to y row by row, in order (20 % faster than column-major; 32 rows a
block was slower than 16). One call per module serves every task of the batch. `embedding_fix`
adds ΔE's row of each token id to y (two binary searches per token).

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
#include <vector>

namespace {
constexpr int64_t W = 16;   // rows per block: the sums one stored entry updates
constexpr int64_t OB = 64;  // output columns per pass: their [W, OB] sums stay in L1

// y[r0:r0+n] += x[r0:r0+n] @ dW^T, dW [out, in] given by its sorted row-major flat indices
template <typename I>
void linear_block(const float* __restrict__ x, float* __restrict__ y, int64_t in, int64_t out,
                  int64_t r0, int64_t n, const I* __restrict__ idx, const float* __restrict__ val,
                  int64_t nnz, float* __restrict__ xt, float* __restrict__ yt) {
  if (n < W) std::fill(xt, xt + in * W, 0.0f);
  for (int64_t j = 0; j < n; ++j) {  // xt [in, W]: the block's rows, transposed
    const float* xr = x + (r0 + j) * in;
    for (int64_t i = 0; i < in; ++i) xt[i * W + j] = xr[i];
  }
  int64_t k = 0;
  for (int64_t o0 = 0; o0 < out; o0 += OB) {
    const int64_t ob = std::min(OB, out - o0);
    for (int64_t o = 0; o < ob; ++o) {  // yt [W, OB]: x @ dW^T for these columns
      float acc[W] = {0};
      const int64_t first = (o0 + o) * in, end = first + in;
      for (; k < nnz && static_cast<int64_t>(idx[k]) < end; ++k) {
        const int64_t c = static_cast<int64_t>(idx[k]) - first;
        if (c < 0) continue;  // (never, for validated deltas: indices strictly increase)
        const float v = val[k];
        const float* xc = xt + c * W;
        for (int64_t j = 0; j < W; ++j) acc[j] += v * xc[j];
      }
      for (int64_t j = 0; j < W; ++j) yt[j * OB + o] = acc[j];
    }
    for (int64_t j = 0; j < n; ++j) {  // added to y row by row, in order
      float* yr = y + (r0 + j) * out + o0;
      const float* ytr = yt + j * OB;
      for (int64_t o = 0; o < ob; ++o) yr[o] += ytr[o];
    }
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
}  // namespace

void linear_fix(torch::Tensor x, torch::Tensor y, std::vector<torch::Tensor> idxs,
                std::vector<torch::Tensor> vals, std::vector<int64_t> starts,
                std::vector<int64_t> ends) {
  check(x, "x"); check(y, "y");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x [rows, in], y [rows, out]");
  const int64_t in = x.size(1), out = y.size(1), rows = x.size(0);
  std::vector<float> xt(in * W), yt(W * OB);
  for (size_t s = 0; s < idxs.size(); ++s) {
    check_run(idxs[s], vals[s], in * out);
    TORCH_CHECK(0 <= starts[s] && starts[s] <= ends[s] && ends[s] <= rows, "rows out of range");
    for (int64_t r = starts[s]; r < ends[s]; r += W) {
      const int64_t n = std::min(W, ends[s] - r);
      if (idxs[s].scalar_type() == torch::kInt) {
        linear_block(x.data_ptr<float>(), y.data_ptr<float>(), in, out, r, n,
                     idxs[s].data_ptr<int32_t>(), vals[s].data_ptr<float>(), idxs[s].numel(),
                     xt.data(), yt.data());
      } else {
        linear_block(x.data_ptr<float>(), y.data_ptr<float>(), in, out, r, n,
                     idxs[s].data_ptr<int64_t>(), vals[s].data_ptr<float>(), idxs[s].numel(),
                     xt.data(), yt.data());
      }
    }
  }
}

void embedding_fix(torch::Tensor ids, torch::Tensor y, int64_t vocab,
                   std::vector<torch::Tensor> idxs, std::vector<torch::Tensor> vals,
                   std::vector<int64_t> starts, std::vector<int64_t> ends) {
  check(ids, "ids"); check(y, "y");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && y.scalar_type() == torch::kFloat, "dtypes");
  TORCH_CHECK(y.dim() == 2 && ids.numel() == y.size(0), "ids [rows], y [rows, hidden]");
  const int64_t hidden = y.size(1), rows = y.size(0);
  for (size_t s = 0; s < idxs.size(); ++s) {
    check_run(idxs[s], vals[s], vocab * hidden);
    TORCH_CHECK(0 <= starts[s] && starts[s] <= ends[s] && ends[s] <= rows, "rows out of range");
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
    the flags are part of the build's key, so a shared cache folder never mixes them)."""
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
                           functions=["linear_fix", "embedding_fix"], extra_cflags=flags,
                           build_directory=str(folder), verbose=False)
    except Exception as exc:  # no compiler, no ninja, no headers, a read-only cache: all the same
        log.warning("cannot build the mixed-batch kernels (%s); using torch sparse ops instead",
                    type(exc).__name__)
        return None


def reset() -> None:
    """Forget the loaded kernels (tests: to exercise the fallback)."""
    with _lock:
        _state.clear()
