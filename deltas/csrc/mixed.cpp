// The mixed batch's CPU kernels (deltas/_mixed_kernel.py): several tasks' sparse corrections in
// one call. Safety invariant: whatever they are given, they read and write only inside their
// buffers. Row ranges and shapes are checked before anything is written; every delta index is
// checked against both bounds of its place, and sortedness is never trusted: an entry out of
// place (past its matrix, below its column's first index, out of order) is refused with the
// entry's position (IndexError), never followed.
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
// row-major flat indices: each output column's entries follow one another. Returns -1, or the
// position of the first entry out of place (below its column's first index: negative or out of
// order; or past the matrix), none of whose column's sums reached y.
template <int V, typename I>
int64_t pass(const float* __restrict__ xt, float* __restrict__ yt, float* __restrict__ y, int64_t n,
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
      for (int64_t q = k; q < e; ++q)  // in [first, end) and increasing: cheap next to the sums
        if (static_cast<int64_t>(idx[q]) < first || (q > k && idx[q] <= idx[q - 1])) return q;
      vec acc0[V], acc1[V];  // two chains: consecutive entries do not wait on each other
      for (int v = 0; v < V; ++v) acc0[v] = acc1[v] = vec{};
      int64_t q = k;
      for (; q + 1 < e; q += 2) {
        const int64_t c0 = static_cast<int64_t>(idx[q]) - first;
        const int64_t c1 = static_cast<int64_t>(idx[q + 1]) - first;
        const float w0 = val[q], w1 = val[q + 1];
        for (int v = 0; v < V; ++v) acc0[v] += w0 * load(xt + c0 * W + v * L);
        for (int v = 0; v < V; ++v) acc1[v] += w1 * load(xt + c1 * W + v * L);
      }
      if (q < e) {
        const int64_t c0 = static_cast<int64_t>(idx[q]) - first;
        const float w = val[q];
        for (int v = 0; v < V; ++v) acc0[v] += w * load(xt + c0 * W + v * L);
      }
      k = e;
      for (int v = 0; v < V; ++v) store(yt + (o - o0) * W + v * L, acc0[v] + acc1[v]);
    }
    transpose<true>(yt, W, y + o0, out, ob, n);  // y[t, o0 + o] += yt[o, t]
  }
  return k < nnz ? k : -1;  // entries left past the last column: past the matrix
}

template <typename I>
int64_t run_pass(int64_t vectors, const float* xt, float* yt, float* y, int64_t n, int64_t in,
              int64_t out, const I* idx, const float* val, int64_t nnz) {
  switch (vectors) {
    case 1: return pass<1>(xt, yt, y, n, in, out, idx, val, nnz);
    case 2: return pass<2>(xt, yt, y, n, in, out, idx, val, nnz);
    case 3: return pass<3>(xt, yt, y, n, in, out, idx, val, nnz);
    case 4: return pass<4>(xt, yt, y, n, in, out, idx, val, nnz);
    case 5: return pass<5>(xt, yt, y, n, in, out, idx, val, nnz);
    case 6: return pass<6>(xt, yt, y, n, in, out, idx, val, nnz);
    case 7: return pass<7>(xt, yt, y, n, in, out, idx, val, nnz);
    default: return pass<8>(xt, yt, y, n, in, out, idx, val, nnz);
  }
}

// y[r] += dE[ids[r]] for r in [r0, r1) (ids checked), dE [vocab, hidden] given by sorted flat
// indices. The binary searches stay inside idx whatever it holds; an entry they find that is not
// in the id's row or not above the one before it (idx unsorted) is refused: returns its
// position, or -1.
template <typename I>
int64_t embedding_rows(const int64_t* ids, float* y, int64_t hidden, int64_t r0, int64_t r1,
                       const I* idx, const float* val, int64_t nnz) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t first = ids[r] * hidden;
    const I* lo = std::lower_bound(idx, idx + nnz, static_cast<I>(first));
    const I* hi = std::lower_bound(lo, idx + nnz, static_cast<I>(first + hidden));
    int64_t prev = -1;
    for (const I* p = lo; p < hi; ++p) {
      const int64_t c = static_cast<int64_t>(*p) - first;
      if (c < 0 || c >= hidden || c <= prev) return p - idx;
      y[r * hidden + c] += val[p - idx];
      prev = c;
    }
  }
  return -1;
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

// the segments' rows, in tokens: [per_row * starts[s], per_row * ends[s]), checked inside the
// batch (before multiplying: no overflow), in order and not overlapping
void token_rows(std::vector<int64_t>& starts, std::vector<int64_t>& ends, int64_t per_row,
                int64_t rows, size_t count) {
  TORCH_CHECK(starts.size() == count && ends.size() == count && per_row > 0, "one range a run");
  for (size_t s = 0; s < count; ++s) {
    TORCH_CHECK_INDEX(0 <= starts[s] && starts[s] <= ends[s] && ends[s] <= rows / per_row,
                      "rows [", starts[s], ", ", ends[s], ") of run ", s, " out of range");
    TORCH_CHECK_INDEX(s == 0 || ends[s - 1] <= starts[s], "runs in order, not overlapping");
  }
  for (size_t s = 0; s < count; ++s) {
    starts[s] *= per_row; ends[s] *= per_row;
  }
}

// the delta of run s: an entry out of place at `bad` is an IndexError naming it
void refuse(int64_t bad, size_t s) {
  TORCH_CHECK_INDEX(bad < 0, "delta index at position ", bad, " of run ", s,
                    " is out of place (outside its matrix or row, or not above the one before it)");
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
  for (size_t s = 0; s < idxs.size(); ++s) check_run(idxs[s], vals[s], in * out);
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
      const int64_t bad = idxs[s].scalar_type() == torch::kInt
          ? run_pass(vectors, xt_buf.data(), yt_buf.data(), yp + a * out, n, in, out,
                     idxs[s].data_ptr<int32_t>(), vals[s].data_ptr<float>(), idxs[s].numel())
          : run_pass(vectors, xt_buf.data(), yt_buf.data(), yp + a * out, n, in, out,
                     idxs[s].data_ptr<int64_t>(), vals[s].data_ptr<float>(), idxs[s].numel());
      refuse(bad, s);
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
  TORCH_CHECK(vocab >= 0 && (hidden == 0 || vocab <= INT64_MAX / hidden), "vocab out of range");
  token_rows(starts, ends, per_row, rows, idxs.size());
  TORCH_CHECK(vals.size() == idxs.size(), "one val a run");
  for (size_t s = 0; s < idxs.size(); ++s) check_run(idxs[s], vals[s], vocab * hidden);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (size_t s = 0; s < idxs.size(); ++s)  // every id of every run, before anything is written
    for (int64_t r = starts[s]; r < ends[s]; ++r)
      TORCH_CHECK_INDEX(0 <= ip[r] && ip[r] < vocab, "id ", ip[r], " out of range");
  for (size_t s = 0; s < idxs.size(); ++s) {
    const int64_t bad = idxs[s].scalar_type() == torch::kInt
        ? embedding_rows(ip, y.data_ptr<float>(), hidden, starts[s], ends[s],
                         idxs[s].data_ptr<int32_t>(), vals[s].data_ptr<float>(), idxs[s].numel())
        : embedding_rows(ip, y.data_ptr<float>(), hidden, starts[s], ends[s],
                         idxs[s].data_ptr<int64_t>(), vals[s].data_ptr<float>(), idxs[s].numel());
    refuse(bad, s);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_fix", &linear_fix, "y[rows of run s] += x[rows of run s] @ dW_s^T");
  m.def("embedding_fix", &embedding_fix, "y[rows of run s] += dE_s[ids]");
  m.def("rows_fix", &rows_fix, "y[rows of run s] = (y + scale * gamma_s) + beta_s");
}
