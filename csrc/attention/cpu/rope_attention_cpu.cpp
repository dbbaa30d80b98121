// CPU kernels of apply_rope and rope_attention (forward and backward).
//
// Attention runs on tiles of BQ queries x BK keys held in small per-thread buffers in the
// accumulation type A (float, or double for double inputs). q and k are rotated (RoPE) while their
// tiles are loaded; scores use an online softmax so that only the row statistics (logsumexp) are
// kept for the backward, never the Tq x Tk matrix. The backward recomputes the probabilities from
// the saved logsumexp in two passes: one over query tiles (dq) and one over key tiles (dk, dv),
// each owning its outputs, so no atomics and bit-identical results run to run.
//
// The tile products are written as small register-blocked GEMMs on GCC vector types, so one code
// path serves every head size; head sizes 8, 16 and 64 get compile-time trip counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../attention_common.h"

namespace vqext {
namespace attention {
namespace {

// ---------------------------------------------------------------------------------------------
// Vector helpers
template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t itype __attribute__((vector_size(32)));
  static constexpr int W = 8;
  static itype iota() { return itype{0, 1, 2, 3, 4, 5, 6, 7}; }
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t itype __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static itype iota() { return itype{0, 1, 2, 3}; }
};

template <typename V>
inline V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// exp for float lanes: Cephes-style range reduction and polynomial (about 1 ulp), vectorised;
// inputs below -87 give exp(-87) (callers mask such lanes to zero themselves).
inline Vec<float>::type vexp(Vec<float>::type x) {
  using V = Vec<float>::type;
  using VI = Vec<float>::itype;
  x = x < -87.0f ? V{} - 87.0f : x;
  x = x > 88.0f ? V{} + 88.0f : x;
  V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  V y = p * r * r + r + 1.0f;
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(V));
  return y * scale;
}
inline Vec<double>::type vexp(Vec<double>::type x) {
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename A>
inline A exp_scalar(A x) {
  return std::exp(x);
}

// C[M][N] (+)= A[M][K] * B[K][N]. A(m, k) = a[m * a_rs + k * a_ks]; B and C are row-major.
// M % MR == 0 and N % (NV * W) == 0; KC > 0 fixes K at compile time.
template <typename A, int MR, int NV, int KC>
inline void gemm(int M, int N, int Kdyn, const A* a, int64_t a_rs, int64_t a_ks, const A* b, int64_t ldb, A* c,
                 int64_t ldc, bool accumulate) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  const int K = KC > 0 ? KC : Kdyn;
  for (int m0 = 0; m0 < M; m0 += MR) {
    for (int n0 = 0; n0 < N; n0 += NV * W) {
      V acc[MR][NV];
      for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NV; ++n)
          acc[m][n] = accumulate ? vload<V>(c + (m0 + m) * ldc + n0 + n * W) : V{};
      const A* ap = a + m0 * a_rs;
      const A* bp = b + n0;
      for (int k = 0; k < K; ++k) {
        V bv[NV];
        for (int n = 0; n < NV; ++n) bv[n] = vload<V>(bp + k * ldb + n * W);
        for (int m = 0; m < MR; ++m) {
          const A av = ap[m * a_rs + k * a_ks];
          for (int n = 0; n < NV; ++n) acc[m][n] += av * bv[n];
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NV; ++n) vstore(c + (m0 + m) * ldc + n0 + n * W, acc[m][n]);
    }
  }
}

// Picks the register blocking from N (a multiple of W).
template <typename A, int KC>
inline void gemm_auto(int M, int N, int K, const A* a, int64_t a_rs, int64_t a_ks, const A* b, int64_t ldb, A* c,
                      int64_t ldc, bool accumulate) {
  constexpr int W = Vec<A>::W;
  if (N % (2 * W) == 0) {
    gemm<A, 4, 2, KC>(M, N, K, a, a_rs, a_ks, b, ldb, c, ldc, accumulate);
  } else {
    // one vector per row: 8 rows keep 8 independent FMA chains in flight (FMA latency x ports)
    const int M8 = M / 8 * 8;
    if (M8) gemm<A, 8, 1, KC>(M8, N, K, a, a_rs, a_ks, b, ldb, c, ldc, accumulate);
    if (M > M8) gemm<A, 4, 1, KC>(M - M8, N, K, a + M8 * a_rs, a_rs, a_ks, b, ldb, c + M8 * ldc, ldc, accumulate);
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE tables: cos/sin of pos * base^(-2i/d) for every position any batch element needs, stored
// once per distinct position (batches with equal offsets share rows).
template <typename A>
struct RopeTable {
  int64_t half = 0;
  std::vector<A> cos_, sin_;
  std::vector<int64_t> q_row, k_row;  // row of position (start of batch b) for q and k

  const A* cos_row(int64_t row) const { return cos_.data() + row * half; }
  const A* sin_row(int64_t row) const { return sin_.data() + row * half; }
};

template <typename A>
RopeTable<A> build_table(int64_t d, double base, const std::vector<int64_t>* qstart, int64_t Tq,
                         const std::vector<int64_t>* kstart, int64_t Tk) {
  RopeTable<A> t;
  t.half = d / 2;
  std::vector<std::pair<int64_t, int64_t>> iv;  // [start, end)
  if (qstart)
    for (int64_t s : *qstart) iv.emplace_back(s, s + Tq);
  if (kstart)
    for (int64_t s : *kstart) iv.emplace_back(s, s + Tk);
  std::sort(iv.begin(), iv.end());
  std::vector<int64_t> seg_start, seg_end, seg_row;
  int64_t rows = 0;
  for (auto& p : iv) {
    if (p.second <= p.first) continue;
    if (!seg_start.empty() && p.first <= seg_end.back()) {
      if (p.second > seg_end.back()) {
        rows += p.second - seg_end.back();
        seg_end.back() = p.second;
      }
    } else {
      seg_start.push_back(p.first);
      seg_end.push_back(p.second);
      seg_row.push_back(rows);
      rows += p.second - p.first;
    }
  }
  auto row_of = [&](int64_t pos) -> int64_t {
    if (seg_start.empty()) return 0;
    auto it = std::upper_bound(seg_start.begin(), seg_start.end(), pos);
    const size_t s = static_cast<size_t>(it - seg_start.begin()) - 1;
    return seg_row[s] + (pos - seg_start[s]);
  };
  if (qstart)
    for (int64_t s : *qstart) t.q_row.push_back(Tq > 0 ? row_of(s) : 0);
  if (kstart)
    for (int64_t s : *kstart) t.k_row.push_back(Tk > 0 ? row_of(s) : 0);
  t.cos_.resize(rows * t.half);
  t.sin_.resize(rows * t.half);
  std::vector<double> inv_freq(t.half);
  for (int64_t i = 0; i < t.half; ++i) inv_freq[i] = std::pow(base, -2.0 * static_cast<double>(i) / d);
  std::vector<int64_t> row_pos(rows);
  for (size_t s = 0; s < seg_start.size(); ++s)
    for (int64_t p = seg_start[s]; p < seg_end[s]; ++p) row_pos[seg_row[s] + p - seg_start[s]] = p;
  // The angle is formed in double exactly as the reference does, then rounded to A.
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < t.half; ++i) {
        const double ang = static_cast<double>(row_pos[r]) * inv_freq[i];
        t.cos_[r * t.half + i] = static_cast<A>(std::cos(ang));
        t.sin_[r * t.half + i] = static_cast<A>(std::sin(ang));
      }
  });
  return t;
}

// dst[c] = scale * (R x)[c] (sign = -1 applies R^T); zero-pads dst to dp entries.
template <typename T, typename A>
inline void rotate_row(const T* x, A* dst, int64_t d, int64_t dp, A scale, const A* cs, const A* sn, A sign) {
  if (cs) {
    for (int64_t i = 0; i < d / 2; ++i) {
      const A x0 = static_cast<A>(x[2 * i]), x1 = static_cast<A>(x[2 * i + 1]);
      const A c = cs[i], s = sign * sn[i];
      dst[2 * i] = scale * (x0 * c - x1 * s);
      dst[2 * i + 1] = scale * (x0 * s + x1 * c);
    }
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c] = scale * static_cast<A>(x[c]);
  }
  for (int64_t c = d; c < dp; ++c) dst[c] = A(0);
}

// Same, written as column `col` of a transposed tile (dst[c * ld + col]).
template <typename T, typename A>
inline void rotate_row_to_column(const T* x, A* dst, int64_t ld, int64_t col, int64_t d, int64_t dp, const A* cs,
                                 const A* sn) {
  if (cs) {
    for (int64_t i = 0; i < d / 2; ++i) {
      const A x0 = static_cast<A>(x[2 * i]), x1 = static_cast<A>(x[2 * i + 1]);
      dst[(2 * i) * ld + col] = x0 * cs[i] - x1 * sn[i];
      dst[(2 * i + 1) * ld + col] = x0 * sn[i] + x1 * cs[i];
    }
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c * ld + col] = static_cast<A>(x[c]);
  }
  for (int64_t c = d; c < dp; ++c) dst[c * ld + col] = A(0);
}

struct Problem {
  int64_t B, Hq, Tq, Bk, Hk, Tk, d, group;
  bool causal, rope_q, rope_k;
  double scale, base;
  std::vector<int64_t> qpos, kpos;  // absolute position of row 0, per query batch
};

template <typename A>
constexpr int tile_keys() {
  return 64;
}
constexpr int kTileQueries = 32;

// Turns a row of scores into masked exponentials against `ref` (the running max or the
// logsumexp). Keys at or beyond `limit` get exactly zero. Returns the row's sum.
template <typename A, int BK>
inline A exp_row(A* s, int limit, A ref) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  V sum = V{};
  for (int j = 0; j < BK; j += W) {
    V x = vload<V>(s + j) - ref;
    V e = vexp(x);
    const typename Vec<A>::itype idx = Vec<A>::iota() + j;
    e = idx < limit ? e : V{};
    vstore(s + j, e);
    sum += e;
  }
  A total = 0;
  for (int l = 0; l < W; ++l) total += sum[l];
  return total;
}

template <typename A, int BK>
inline A row_max(const A* s, int limit) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  const A ninf = -std::numeric_limits<A>::infinity();
  V mx = V{} + ninf;
  for (int j = 0; j < BK; j += W) {
    V x = vload<V>(s + j);
    const typename Vec<A>::itype idx = Vec<A>::iota() + j;
    x = idx < limit ? x : V{} + ninf;
    mx = x > mx ? x : mx;
  }
  A out = ninf;
  for (int l = 0; l < W; ++l) out = mx[l] > out ? mx[l] : out;
  return out;
}

// Number of keys of block [kb, kb + nk) that query row i (absolute position qp) sees.
inline int visible_keys(const Problem& pr, int64_t qp, int64_t kp_block, int nk) {
  if (!pr.causal) return nk;
  const int64_t lim = qp - kp_block + 1;
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, lim)));
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Small problems run on the calling thread: waking a thread team costs more than they take.
inline int64_t work_grain(int64_t tasks, double flops) { return flops < 262144.0 ? std::max<int64_t>(tasks, 1) : 1; }

// ---------------------------------------------------------------------------------------------
// Forward. A task is a chunk of QC queries of one (batch, head): each key/value tile is loaded
// (and rotated) once per chunk and reused by its BQ-row sub-tiles.
constexpr int kChunkQueries = 128;

template <typename T, typename A, int DP>
void forward_kernel(const Problem& pr, const T* q, const T* k, const T* v, T* out, A* lse, const RopeTable<A>& tab) {
  constexpr int QC = kChunkQueries, BQ = kTileQueries, BK = tile_keys<A>();
  const int64_t d = pr.d, dp = DP > 0 ? DP : round_up(d, Vec<A>::W);
  const int64_t nqc = (pr.Tq + QC - 1) / QC;
  const A scale = static_cast<A>(pr.scale);
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t grain = work_grain(pr.B * pr.Hq * nqc, static_cast<double>(pr.B) * pr.Hq * pr.Tq * pr.Tk * pr.d);
  at::parallel_for(0, pr.B * pr.Hq * nqc, grain, [&](int64_t t0, int64_t t1) {
    std::vector<A> Qs(QC * dp), KT(dp * BK), Vt(BK * dp), S(BQ * BK), O(QC * dp), m(QC), l(QC);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qc = task % nqc, h = (task / nqc) % pr.Hq, b = task / (nqc * pr.Hq);
      const int64_t bk = pr.Bk == 1 ? 0 : b, hk = h / pr.group;
      const int64_t i0 = qc * QC;
      const int nrows = static_cast<int>(std::min<int64_t>(QC, pr.Tq - i0));
      const int nrows4 = static_cast<int>(round_up(nrows, 4));
      const T* qbase = q + ((b * pr.Hq + h) * pr.Tq + i0) * d;
      const T* kbase = k + (bk * pr.Hk + hk) * pr.Tk * d;
      const T* vbase = v + (bk * pr.Hk + hk) * pr.Tk * d;
      const int64_t qp0 = pr.qpos[b] + i0, kp0 = pr.kpos[b];
      for (int r = 0; r < nrows4; ++r) {
        if (r < nrows) {
          const int64_t row = pr.rope_q ? tab.q_row[b] + i0 + r : 0;
          rotate_row<T, A>(qbase + r * d, Qs.data() + r * dp, d, dp, scale, pr.rope_q ? tab.cos_row(row) : nullptr,
                           pr.rope_q ? tab.sin_row(row) : nullptr, A(1));
        } else {
          std::fill(Qs.begin() + r * dp, Qs.begin() + (r + 1) * dp, A(0));
        }
        m[r] = ninf;
        l[r] = 0;
      }
      std::fill(O.begin(), O.begin() + nrows4 * dp, A(0));
      int64_t kend = pr.Tk;
      if (pr.causal) kend = std::max<int64_t>(0, std::min<int64_t>(pr.Tk, qp0 + nrows - kp0));
      for (int64_t kb = 0; kb < kend; kb += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, kend - kb));
        for (int j = 0; j < BK; ++j) {
          if (j < nk) {
            const int64_t row = pr.rope_k ? tab.k_row[b] + kb + j : 0;
            rotate_row_to_column<T, A>(kbase + (kb + j) * d, KT.data(), BK, j, d, dp,
                                       pr.rope_k ? tab.cos_row(row) : nullptr, pr.rope_k ? tab.sin_row(row) : nullptr);
            rotate_row<T, A>(vbase + (kb + j) * d, Vt.data() + j * dp, d, dp, A(1), nullptr, nullptr, A(1));
          } else {
            for (int64_t c = 0; c < dp; ++c) KT[c * BK + j] = A(0);
            std::fill(Vt.begin() + j * dp, Vt.begin() + (j + 1) * dp, A(0));
          }
        }
        for (int s0 = 0; s0 < nrows; s0 += BQ) {
          const int nq = std::min(BQ, nrows - s0);
          if (pr.causal && qp0 + s0 + nq - 1 < kp0 + kb) continue;  // no row of this sub-tile sees the block
          const int mq = static_cast<int>(round_up(nq, 4));
          gemm_auto<A, DP>(mq, BK, static_cast<int>(dp), Qs.data() + s0 * dp, dp, 1, KT.data(), BK, S.data(), BK,
                           false);
          for (int r = 0; r < mq; ++r) {
            A* srow = S.data() + r * BK;
            const int lim = r < nq ? visible_keys(pr, qp0 + s0 + r, kp0 + kb, nk) : 0;
            if (lim <= 0) {
              std::fill(srow, srow + BK, A(0));
              continue;
            }
            const int rr = s0 + r;
            const A mnew = std::max(m[rr], row_max<A, BK>(srow, lim));
            const A corr = m[rr] == ninf ? A(0) : exp_scalar(m[rr] - mnew);
            const A sum = exp_row<A, BK>(srow, lim, mnew);
            l[rr] = l[rr] * corr + sum;
            m[rr] = mnew;
            if (corr != A(1))
              for (int64_t c = 0; c < dp; ++c) O[rr * dp + c] *= corr;
          }
          gemm_auto<A, 0>(mq, static_cast<int>(dp), nk, S.data(), BK, 1, Vt.data(), dp, O.data() + s0 * dp, dp, true);
        }
      }
      for (int r = 0; r < nrows; ++r) {
        T* orow = out + ((b * pr.Hq + h) * pr.Tq + i0 + r) * d;
        A* lrow = lse + (b * pr.Hq + h) * pr.Tq + i0 + r;
        if (l[r] > 0) {
          const A inv = A(1) / l[r];
          for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<T>(O[r * dp + c] * inv);
          *lrow = m[r] + std::log(l[r]);
        } else {
          for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<T>(0);
          *lrow = ninf;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward, one pass (flash-attention-2 style). A task is one (query batch b, kv head hk): it
// owns dq for the grouped query heads of (b, hk), and dk, dv of (b, hk) when k is not shared.
// Its queries and output gradients are rotated and staged once; for each key block, each
// query tile recomputes P = exp(S - lse) and forms dS = P * (dP - D), then
//   dV += P^T dO,  dK += dS^T (scale R q),  dQ += dS (R k).
// With a shared k (Bk == 1) the dk, dv of a task are added into per-thread partial sums that are
// reduced at the end; at::parallel_for hands each thread a fixed contiguous range of tasks, so
// the summation order, and the result, is the same run to run for a given thread count.
template <typename T, typename A, int DP>
void backward_kernel(const Problem& pr, const T* gout, const T* q, const T* k, const T* v, const A* lse,
                     const A* Drow, T* dq, A* dk_out, A* dv_out, int64_t partial_stride, int64_t nthreads,
                     const RopeTable<A>& tab, int64_t grain) {
  constexpr int BQ = kTileQueries, BK = tile_keys<A>();
  const int64_t d = pr.d, dp = DP > 0 ? DP : round_up(d, Vec<A>::W);
  const int64_t nkb = (pr.Tk + BK - 1) / BK;
  const int64_t tq4 = round_up(pr.Tq, 4);
  const A scale = static_cast<A>(pr.scale);
  // A query tile starts at the first row that sees the key block (any row, not a multiple of 4)
  // and spans mq = round_up(nq, 4) rows, so it can run up to 3 rows past the last group's staged
  // rows: those padding rows stay zero (found by the ASan build, .ci/sanitize.sh).
  const int64_t staged = (pr.group * tq4 + 3) * dp;
  at::parallel_for(0, pr.B * pr.Hk, grain, [&](int64_t t0, int64_t t1) {
    std::vector<A> Qs(staged), dO(staged), dQ(staged), L(pr.group * tq4), Dv(pr.group * tq4);
    std::vector<A> KT(dp * BK), Kr(BK * dp), VT(dp * BK), S(BQ * BK), dP(BQ * BK), dKT(dp * BK), dVT(dp * BK);
    const int64_t tid = pr.Bk == 1 ? at::get_thread_num() : 0;
    TORCH_CHECK(tid < nthreads, "rope_attention backward: unexpected thread index");
    A* dk_part = dk_out + tid * partial_stride;
    A* dv_part = dv_out + tid * partial_stride;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t hk = task % pr.Hk, b = task / pr.Hk;
      const int64_t bk = pr.Bk == 1 ? 0 : b;
      const int64_t qs = pr.qpos[b], ks = pr.kpos[b];
      for (int64_t g = 0; g < pr.group; ++g) {
        const int64_t rowbase = (b * pr.Hq + hk * pr.group + g) * pr.Tq;
        for (int64_t i = 0; i < tq4; ++i) {
          A* qrow = Qs.data() + (g * tq4 + i) * dp;
          A* orow = dO.data() + (g * tq4 + i) * dp;
          if (i < pr.Tq) {
            const int64_t row = pr.rope_q ? tab.q_row[b] + i : 0;
            rotate_row<T, A>(q + (rowbase + i) * d, qrow, d, dp, scale, pr.rope_q ? tab.cos_row(row) : nullptr,
                             pr.rope_q ? tab.sin_row(row) : nullptr, A(1));
            rotate_row<T, A>(gout + (rowbase + i) * d, orow, d, dp, A(1), nullptr, nullptr, A(1));
            L[g * tq4 + i] = lse[rowbase + i];
            Dv[g * tq4 + i] = Drow[rowbase + i];
          } else {
            std::fill(qrow, qrow + dp, A(0));
            std::fill(orow, orow + dp, A(0));
          }
        }
      }
      std::fill(dQ.begin(), dQ.end(), A(0));
      const int64_t kvbase = (bk * pr.Hk + hk) * pr.Tk * d;
      for (int64_t kblk = 0; kblk < nkb; ++kblk) {
        const int64_t kb = kblk * BK;
        const int nk = static_cast<int>(std::min<int64_t>(BK, pr.Tk - kb));
        // first query row that sees key kb
        const int64_t qstart = pr.causal ? std::max<int64_t>(0, ks + kb - qs) : 0;
        if (qstart >= pr.Tq) break;
        for (int j = 0; j < BK; ++j) {
          if (j < nk) {
            const int64_t row = pr.rope_k ? tab.k_row[b] + kb + j : 0;
            const A* cs = pr.rope_k ? tab.cos_row(row) : nullptr;
            const A* sn = pr.rope_k ? tab.sin_row(row) : nullptr;
            rotate_row_to_column<T, A>(k + kvbase + (kb + j) * d, KT.data(), BK, j, d, dp, cs, sn);
            rotate_row<T, A>(k + kvbase + (kb + j) * d, Kr.data() + j * dp, d, dp, A(1), cs, sn, A(1));
            rotate_row_to_column<T, A>(v + kvbase + (kb + j) * d, VT.data(), BK, j, d, dp, nullptr, nullptr);
          } else {
            for (int64_t c = 0; c < dp; ++c) KT[c * BK + j] = VT[c * BK + j] = A(0);
            std::fill(Kr.begin() + j * dp, Kr.begin() + (j + 1) * dp, A(0));
          }
        }
        std::fill(dKT.begin(), dKT.end(), A(0));
        std::fill(dVT.begin(), dVT.end(), A(0));
        for (int64_t g = 0; g < pr.group; ++g) {
          for (int64_t i0 = qstart; i0 < pr.Tq; i0 += BQ) {
            const int nq = static_cast<int>(std::min<int64_t>(BQ, pr.Tq - i0));
            const int mq = static_cast<int>(round_up(nq, 4));
            const int64_t ro = g * tq4 + i0;  // staged row of the tile's first query
            const A* Qt = Qs.data() + ro * dp;
            const A* dOt = dO.data() + ro * dp;
            gemm_auto<A, DP>(mq, BK, static_cast<int>(dp), Qt, dp, 1, KT.data(), BK, S.data(), BK, false);
            gemm_auto<A, DP>(mq, BK, static_cast<int>(dp), dOt, dp, 1, VT.data(), BK, dP.data(), BK, false);
            for (int r = 0; r < mq; ++r) {
              A* srow = S.data() + r * BK;
              A* dprow = dP.data() + r * BK;
              const int lim = r < nq ? visible_keys(pr, qs + i0 + r, ks + kb, nk) : 0;
              if (lim <= 0) {
                std::fill(srow, srow + BK, A(0));
                std::fill(dprow, dprow + BK, A(0));
                continue;
              }
              exp_row<A, BK>(srow, lim, L[ro + r]);
              const A Di = Dv[ro + r];
              for (int j = 0; j < BK; ++j) dprow[j] = srow[j] * (dprow[j] - Di);  // dS
            }
            gemm_auto<A, 0>(static_cast<int>(dp), BK, mq, dOt, 1, dp, S.data(), BK, dVT.data(), BK, true);
            gemm_auto<A, 0>(static_cast<int>(dp), BK, mq, Qt, 1, dp, dP.data(), BK, dKT.data(), BK, true);
            gemm_auto<A, 0>(mq, static_cast<int>(dp), nk, dP.data(), BK, 1, Kr.data(), dp, dQ.data() + ro * dp, dp,
                            true);
          }
        }
        // dk back to k's frame (R^T at this batch's key positions); add into this task's output
        A* dkd = dk_part + (hk * pr.Tk + kb) * d + (pr.Bk == 1 ? 0 : b * pr.Hk * pr.Tk * d);
        A* dvd = dv_part + (hk * pr.Tk + kb) * d + (pr.Bk == 1 ? 0 : b * pr.Hk * pr.Tk * d);
        for (int j = 0; j < nk; ++j) {
          if (pr.rope_k) {
            const int64_t row = tab.k_row[b] + kb + j;
            const A* cs = tab.cos_row(row);
            const A* sn = tab.sin_row(row);
            for (int64_t i = 0; i < d / 2; ++i) {
              const A g0 = dKT[(2 * i) * BK + j], g1 = dKT[(2 * i + 1) * BK + j];
              dkd[j * d + 2 * i] += g0 * cs[i] + g1 * sn[i];
              dkd[j * d + 2 * i + 1] += -g0 * sn[i] + g1 * cs[i];
            }
          } else {
            for (int64_t c = 0; c < d; ++c) dkd[j * d + c] += dKT[c * BK + j];
          }
          for (int64_t c = 0; c < d; ++c) dvd[j * d + c] += dVT[c * BK + j];
        }
      }
      for (int64_t g = 0; g < pr.group; ++g) {
        const int64_t rowbase = (b * pr.Hq + hk * pr.group + g) * pr.Tq;
        for (int64_t i = 0; i < pr.Tq; ++i) {
          const int64_t row = pr.rope_q ? tab.q_row[b] + i : 0;
          A tmp[128];
          rotate_row<A, A>(dQ.data() + (g * tq4 + i) * dp, tmp, d, d, scale, pr.rope_q ? tab.cos_row(row) : nullptr,
                           pr.rope_q ? tab.sin_row(row) : nullptr, A(-1));
          T* dst = dq + (rowbase + i) * d;
          for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(tmp[c]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Host entry points
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_offset,
                     const c10::optional<at::Tensor>& q_offsets, int64_t k_offset,
                     const c10::optional<at::Tensor>& k_offsets, bool causal, bool rope_q, bool rope_k, double scale,
                     double base) {
  const AttentionShape s = check_attention(q, k, v);
  check_offsets(q_offsets, s.B, q, "q_offset");
  check_offsets(k_offsets, s.B, q, "k_offset");
  Problem pr{s.B, s.Hq, s.Tq, s.Bk, s.Hk, s.Tk, s.d, s.group, causal, rope_q, rope_k, scale, base, {}, {}};
  pr.qpos = host_positions(q_offset, q_offsets, s.B);
  pr.kpos = host_positions(k_offset, k_offsets, s.B);
  return pr;
}

template <typename F>
void dispatch_head_size(int64_t dp, F&& f) {
  switch (dp) {
    case 8: f(std::integral_constant<int, 8>()); break;
    case 16: f(std::integral_constant<int, 16>()); break;
    case 64: f(std::integral_constant<int, 64>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}

template <typename A>
RopeTable<A> tables_for(const Problem& pr) {
  return build_table<A>(pr.d, pr.base, pr.rope_q ? &pr.qpos : nullptr, pr.Tq, pr.rope_k ? &pr.kpos : nullptr, pr.Tk);
}

std::tuple<at::Tensor, at::Tensor> rope_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, int64_t q_offset,
                                                          const c10::optional<at::Tensor>& q_offsets, int64_t k_offset,
                                                          const c10::optional<at::Tensor>& k_offsets, bool causal,
                                                          bool rope_q, bool rope_k, double scale, double base) {
  const Problem pr =
      make_problem(q_in, k_in, v_in, q_offset, q_offsets, k_offset, k_offsets, causal, rope_q, rope_k, scale, base);
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "rope_attention on CPU takes float32 or float64, got ", q_in.scalar_type());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.Tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rope_attention_fwd_cpu", [&] {
    using A = scalar_t;
    const RopeTable<A> tab = tables_for<A>(pr);
    dispatch_head_size(round_up(pr.d, Vec<A>::W), [&](auto DPc) {
      forward_kernel<scalar_t, A, decltype(DPc)::value>(pr, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                                        v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                        lse.data_ptr<A>(), tab);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_bwd_cpu(
    const at::Tensor& gout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t q_offset, const c10::optional<at::Tensor>& q_offsets,
    int64_t k_offset, const c10::optional<at::Tensor>& k_offsets, bool causal, bool rope_q, bool rope_k, double scale,
    double base) {
  const Problem pr =
      make_problem(q_in, k_in, v_in, q_offset, q_offsets, k_offset, k_offsets, causal, rope_q, rope_k, scale, base);
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "rope_attention on CPU takes float32 or float64, got ", q_in.scalar_type());
  TORCH_CHECK(gout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "grad_out and out must have q's shape");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == pr.B && lse_in.size(1) == pr.Hq && lse_in.size(2) == pr.Tq,
              "lse must have shape (B, Hq, Tq)");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor gout = gout_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(q.scalar_type()).contiguous();
  // D_i = rowsum(dO * O): the softmax-Jacobian term of flash-attention-2's backward
  const at::Tensor Drow = (gout * out_in.to(q.scalar_type())).sum(-1).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  // dk, dv accumulate in A; with a shared k (Bk == 1) each thread has its own partial sums
  const int64_t nthreads = pr.Bk == 1 ? at::get_num_threads() : 1;
  const int64_t kv_numel = k.numel();
  at::Tensor dk_acc = at::zeros({nthreads, kv_numel}, q.options());
  at::Tensor dv_acc = at::zeros({nthreads, kv_numel}, q.options());
  const int64_t grain = work_grain(pr.B * pr.Hk, static_cast<double>(pr.B) * pr.Hq * pr.Tq * pr.Tk * pr.d);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rope_attention_bwd_cpu", [&] {
    using A = scalar_t;
    const RopeTable<A> tab = tables_for<A>(pr);
    dispatch_head_size(round_up(pr.d, Vec<A>::W), [&](auto DPc) {
      constexpr int DP = decltype(DPc)::value;
      backward_kernel<scalar_t, A, DP>(pr, gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                       v.data_ptr<scalar_t>(), lse.data_ptr<A>(), Drow.data_ptr<A>(),
                                       dq.data_ptr<scalar_t>(), dk_acc.data_ptr<A>(), dv_acc.data_ptr<A>(), kv_numel,
                                       nthreads, tab, grain);
    });
  });
  at::Tensor dk = dk_acc.sum(0).view(k.sizes());
  at::Tensor dv = dv_acc.sum(0).view(v.sizes());
  return {dq, dk, dv};
}

at::Tensor apply_rope_cpu(const at::Tensor& x_in, int64_t offset, const c10::optional<at::Tensor>& offsets, double base,
                          bool inverse) {
  TORCH_CHECK(x_in.dim() == 3 || x_in.dim() == 4, "x must have 3 (B, T, d) or 4 (B, H, T, d) dims, got ", x_in.dim());
  TORCH_CHECK(x_in.is_floating_point(), "x must be a floating-point tensor, got ", x_in.scalar_type());
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(d % 2 == 0, "x's last dim (d) must be even, got ", d);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(-2), H = x.dim() == 4 ? x.size(1) : 1;
  check_offsets(offsets, B, x, "offset");
  const std::vector<int64_t> pos = host_positions(offset, offsets, B);
  at::Tensor y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rope_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const RopeTable<A> tab = build_table<A>(d, base, &pos, T, nullptr, 0);
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const A sign = inverse ? A(-1) : A(1);
    at::parallel_for(0, B * H * T, 256, [&](int64_t r0, int64_t r1) {
      A tmp[4096];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % T, b = r / (H * T);
        const int64_t row = tab.q_row[b] + t;
        for (int64_t c0 = 0; c0 < d; c0 += 4096) {
          const int64_t n = std::min<int64_t>(4096, d - c0);
          rotate_row<scalar_t, A>(src + r * d + c0, tmp, n, n, A(1), tab.cos_row(row) + c0 / 2,
                                  tab.sin_row(row) + c0 / 2, sign);
          for (int64_t c = 0; c < n; ++c) dst[r * d + c0 + c] = static_cast<scalar_t>(tmp[c]);
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqext, CPU, m) {
  m.impl("apply_rope", &apply_rope_cpu);
  m.impl("rope_attention_fwd", &rope_attention_fwd_cpu);
  m.impl("rope_attention_bwd", &rope_attention_bwd_cpu);
}

}  // namespace attention
}  // namespace vqext
