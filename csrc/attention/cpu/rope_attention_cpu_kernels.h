// Instruction-set-specific part of the CPU rope_attention kernels. Included once by each kernel
// translation unit, inside an anonymous namespace, after it has defined VQEXT_VEC_BYTES (16:
// rope_attention_cpu_portable.cpp; 32: _avx2.cpp; 64: _avx512.cpp, the last two under
// `#pragma GCC target`), so one source serves every vector width.
#ifndef VQEXT_VEC_BYTES
#error "define VQEXT_VEC_BYTES before including rope_attention_cpu_kernels.h"
#endif

// ---------------------------------------------------------------------------------------------
// Vector helpers
template <typename A>
struct Vec;
constexpr int kVecBytes = VQEXT_VEC_BYTES;
// 32 vector registers with AVX-512 (16 with AVX2): room for wider register blocks.
constexpr bool kManyRegisters = kVecBytes == 64;
template <typename S, typename I>
struct VecOf {
  typedef S type __attribute__((vector_size(kVecBytes)));
  typedef I itype __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / static_cast<int>(sizeof(S));
  static itype iota() {
    itype v;
    for (int i = 0; i < W; ++i) v[i] = i;
    return v;
  }
};
template <>
struct Vec<float> : VecOf<float, int32_t> {};
template <>
struct Vec<double> : VecOf<double, int64_t> {};

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

// x clamped to [-bound, bound] with NaN kept: vmaxps/vminps return their second operand when
// either is NaN, so x goes second. (The same select written with vector comparisons compiles to a
// compare and a blend on x86; the portable width uses it.)
inline Vec<float>::type vclamp_keep_nan(Vec<float>::type x, float bound) {
  using V = Vec<float>::type;
#if VQEXT_VEC_BYTES == 64
  const __m512 lo = _mm512_set1_ps(-bound), hi = _mm512_set1_ps(bound);
  return reinterpret_cast<V>(_mm512_min_ps(hi, _mm512_max_ps(lo, reinterpret_cast<__m512>(x))));
#elif VQEXT_VEC_BYTES == 32
  const __m256 lo = _mm256_set1_ps(-bound), hi = _mm256_set1_ps(bound);
  return reinterpret_cast<V>(_mm256_min_ps(hi, _mm256_max_ps(lo, reinterpret_cast<__m256>(x))));
#else
  x = x < -bound ? V{} - bound : x;  // comparisons with NaN are false: NaN passes through
  return x > bound ? V{} + bound : x;
#endif
}

// 2^x for float lanes (Cephes exp2f polynomial on [-1/2, 1/2], about 1 ulp). AVX2 and the
// portable width clamp inputs to [-127, 127] (2^-127 comes out as 0); AVX-512 is exact at the ends. NaN stays NaN, so a NaN
// score poisons its row's sum as in the reference's softmax instead of being clamped into a finite
// weight. Every softmax here runs in base 2 with log2(e) folded into the staged, scaled query: a
// shorter reduction than exp's (no ln 2 split), with AVX-512 one rounding instruction and one
// vscalefps for the exponent.
inline Vec<float>::type vexp2(Vec<float>::type x) {
  using V = Vec<float>::type;
#if VQEXT_VEC_BYTES == 64
  // n = round(x) and f = x - n (vreduceps) are independent and need no clamps: +-inf reduce to
  // f = 0 and vscalefps gives 2^-inf = 0, 2^inf = inf; NaN stays NaN.
  const __m512 xm = reinterpret_cast<__m512>(x);
  const V n = reinterpret_cast<V>(_mm512_roundscale_ps(xm, _MM_FROUND_TO_NEAREST_INT));
  const V f = reinterpret_cast<V>(_mm512_reduce_ps(xm, _MM_FROUND_TO_NEAREST_INT));
#else
  x = vclamp_keep_nan(x, 127.0f);
  const V n = (x + 12582912.0f) - 12582912.0f;  // round to nearest
  const V f = x - n;
#endif
  V p = V{} + 1.535336188319500E-4f;
  p = p * f + 1.339887440266574E-3f;
  p = p * f + 9.618437357674640E-3f;
  p = p * f + 5.550332471162809E-2f;
  p = p * f + 2.402264791363012E-1f;
  p = p * f + 6.931472028550421E-1f;
  p = p * f + 1.0f;
#if VQEXT_VEC_BYTES == 64
  return reinterpret_cast<V>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(n)));
#else
  using VI = Vec<float>::itype;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(V));
  return p * scale;
#endif
}
inline Vec<double>::type vexp2(Vec<double>::type x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = std::exp2(x[i]);
  return x;
}


// Horizontal sum and max of a vector by halving (log2(W) vector steps instead of W scalar ones).
template <typename S, int Bytes>
struct Reduce {
  typedef S V __attribute__((vector_size(Bytes)));
  typedef S H __attribute__((vector_size(Bytes / 2)));
  static constexpr int N = Bytes / static_cast<int>(sizeof(S));
  // Lane shuffles, not a trip through memory: the accumulators stay in registers.
  template <size_t... I>
  static void split(V v, H& lo, H& hi, std::index_sequence<I...>) {
    lo = __builtin_shufflevector(v, v, static_cast<int>(I)...);
    hi = __builtin_shufflevector(v, v, static_cast<int>(I + N / 2)...);
  }
  static void halves(V v, H& lo, H& hi) { split(v, lo, hi, std::make_index_sequence<N / 2>()); }
  static S sum(V v) {
    H lo, hi;
    halves(v, lo, hi);
    return Reduce<S, Bytes / 2>::sum(lo + hi);
  }
  static S max(V v) {
    H lo, hi;
    halves(v, lo, hi);
    return Reduce<S, Bytes / 2>::max(lo > hi ? lo : hi);
  }
};
template <typename S>
struct Reduce<S, 16> {
  typedef S V __attribute__((vector_size(16)));
  static S sum(V v) {
    S t = v[0];
    for (int l = 1; l < static_cast<int>(16 / sizeof(S)); ++l) t += v[l];
    return t;
  }
  static S max(V v) {
    S t = v[0];
    for (int l = 1; l < static_cast<int>(16 / sizeof(S)); ++l) t = v[l] > t ? v[l] : t;
    return t;
  }
};

// C[M][N] (+)= A[M][K] * B[K][N]. A(m, k) = a[m * a_rs + k * a_ks]; B and C are row-major.
// M % MR == 0 and N % (NV * W) == 0; KC > 0 fixes K at compile time. With a non-null `row_max`
// (C overwritten, not accumulated) it also gets each row's max over its N results, taken from
// the accumulators before they are stored: the softmax then needs no pass of its own to find it
// (NaN results are skipped, as in row_max()).
template <typename A, int MR, int NV, int KC>
inline void gemm(int M, int N, int Kdyn, const A* a, int64_t a_rs, int64_t a_ks, const A* b, int64_t ldb, A* c,
                 int64_t ldc, bool accumulate, A* row_max = nullptr) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  const int K = KC > 0 ? KC : Kdyn;
  for (int m0 = 0; m0 < M; m0 += MR) {
    V mx[MR];
    for (int m = 0; m < MR; ++m) mx[m] = V{} - std::numeric_limits<A>::infinity();
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
        for (int n = 0; n < NV; ++n) {
          vstore(c + (m0 + m) * ldc + n0 + n * W, acc[m][n]);
          if (row_max) mx[m] = acc[m][n] > mx[m] ? acc[m][n] : mx[m];
        }
    }
    if (row_max)
      for (int m = 0; m < MR; ++m) row_max[m0 + m] = Reduce<A, kVecBytes>::max(mx[m]);
  }
}

// Picks the register blocking from N (a multiple of W).
template <typename A, int KC>
inline void gemm_auto(int M, int N, int K, const A* a, int64_t a_rs, int64_t a_ks, const A* b, int64_t ldb, A* c,
                      int64_t ldc, bool accumulate, A* row_max = nullptr) {
  constexpr int W = Vec<A>::W;
  if (kManyRegisters && N % (4 * W) == 0) {
    gemm<A, 4, 4, KC>(M, N, K, a, a_rs, a_ks, b, ldb, c, ldc, accumulate, row_max);
  } else if (N % (2 * W) == 0) {
    gemm<A, 4, 2, KC>(M, N, K, a, a_rs, a_ks, b, ldb, c, ldc, accumulate, row_max);
  } else {
    // one vector per row: 8 rows keep 8 independent FMA chains in flight (FMA latency x ports)
    const int M8 = M / 8 * 8;
    if (M8) gemm<A, 8, 1, KC>(M8, N, K, a, a_rs, a_ks, b, ldb, c, ldc, accumulate, row_max);
    if (M > M8)
      gemm<A, 4, 1, KC>(M - M8, N, K, a + M8 * a_rs, a_rs, a_ks, b, ldb, c + M8 * ldc, ldc, accumulate,
                        row_max ? row_max + M8 : nullptr);
  }
}

// Staged head width: whole vectors, and a multiple of 4, since the dK^T, dV^T GEMMs take dp as
// their row count in blocks of 4 rows (the portable double vectors hold only 2 lanes).
template <typename A>
inline int64_t padded_head(int64_t d) {
  return round_up(d, Vec<A>::W < 4 ? 4 : Vec<A>::W);
}

constexpr int kTileKeys = 64;
constexpr int kTileQueries = 32;

// Turns a row of base-2 scores (log2(e) folded in) into masked powers 2^(s - ref) against `ref`
// (the running max or the logsumexp, in the same base). Keys at or beyond `limit` get exactly
// zero. Returns the row's sum in lane form (callers keep it so; one horizontal sum per row at the
// end instead of one per key block).
template <typename A, int BK>
inline typename Vec<A>::type exp_row(A* s, int limit, A ref) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  V sum = V{};
  if (limit >= BK) {  // unmasked row (every row without a causal mask): no lane test
    for (int j = 0; j < BK; j += W) {
      const V e = vexp2(vload<V>(s + j) - ref);
      vstore(s + j, e);
      sum += e;
    }
  } else {
    for (int j = 0; j < BK; j += W) {
      V e = vexp2(vload<V>(s + j) - ref);
      const typename Vec<A>::itype idx = Vec<A>::iota() + j;
      e = idx < limit ? e : V{};
      vstore(s + j, e);
      sum += e;
    }
  }
  return sum;
}

template <typename A, int BK>
inline A row_max(const A* s, int limit) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  const A ninf = -std::numeric_limits<A>::infinity();
  V mx = V{} + ninf;
  if (limit >= BK) {
    for (int j = 0; j < BK; j += W) {
      const V x = vload<V>(s + j);
      mx = x > mx ? x : mx;
    }
  } else {
    for (int j = 0; j < BK; j += W) {
      V x = vload<V>(s + j);
      const typename Vec<A>::itype idx = Vec<A>::iota() + j;
      x = idx < limit ? x : V{} + ninf;
      mx = x > mx ? x : mx;
    }
  }
  return Reduce<A, kVecBytes>::max(mx);
}

// ---------------------------------------------------------------------------------------------
// Key/value tiles. Keys [kb, kb + nk) of one (batch, kv head), zero-padded to BK keys and dp
// columns: kt = (R k)^T (dp x BK), kr = R k (BK x dp), vt = v^T (dp x BK), vr = v (BK x dp).
// Null outputs are skipped. Rows are staged kGroup keys at a time and each transposed column is
// written kGroup keys (one cache line) at once: written key by key, a column tile's stride of BK
// floats puts all dp lines of a key in a few L1 sets (a call over one 512 x 64 codebook tile took
// 96 us that way, 58 us now).
constexpr int kGroup = 16;
template <typename T, typename A, int BK>
void load_kv_tile(const Problem& pr, const RopeTable<A>& tab, int64_t b, const T* kbase, const T* vbase, int64_t kb,
                  int nk, int64_t dp, A* kt, A* kr, A* vt, A* vr) {
  constexpr int G = BK < kGroup ? BK : kGroup;  // the portable double lanes' 8-key tiles
  static_assert(BK % G == 0, "key tiles hold whole groups");
  const int64_t d = pr.d;
  A rows[G * kMaxPaddedHead];
  auto stage = [&](const T* base, bool rotate, int j0, A* row_major, A* column_major) {
    for (int jj = 0; jj < G; ++jj) {
      A* dst = rows + jj * dp;
      const int j = j0 + jj;
      if (j < nk) {
        const int64_t row = rotate ? tab.k_row[b] + kb + j : 0;
        rotate_row<T, A>(base + (kb + j) * d, dst, d, dp, A(1), rotate ? tab.cos_row(row) : nullptr,
                         rotate ? tab.sin_row(row) : nullptr, A(1));
      } else {
        std::fill(dst, dst + dp, A(0));
      }
    }
    if (row_major) std::copy(rows, rows + G * dp, row_major + j0 * dp);
    if (column_major)
      for (int64_t c = 0; c < dp; ++c)
        for (int jj = 0; jj < G; ++jj) column_major[c * BK + j0 + jj] = rows[jj * dp + c];
  };
  for (int j0 = 0; j0 < BK; j0 += G) {
    if (kt || kr) stage(kbase, pr.rope_k, j0, kr, kt);
    if (vt || vr) stage(vbase, false, j0, vr, vt);
  }
}

// With k and v shared by the whole batch (Bk == 1) and not rotated per batch element, every task
// of a kv head reads the same tiles: they are prepared once, up front, instead of once per task
// (for a codebook, B times fewer loads and transposes, and the tiles stay in cache across tasks).
template <typename A>
struct SharedTiles {
  bool on = false;
  int64_t nkb = 0, tile = 0;  // key blocks per head, elements per tile
  // Left uninitialised: load_kv_tile writes every element, padding included.
  std::unique_ptr<A[]> kt, kr, vt, vr;
  const A* at(const std::unique_ptr<A[]>& t, int64_t hk, int64_t kblk) const {
    return t ? t.get() + (hk * nkb + kblk) * tile : nullptr;
  }
};

template <typename T, typename A, int BK>
SharedTiles<A> make_shared_tiles(const Problem& pr, const RopeTable<A>& tab, const T* k, const T* v, int64_t dp,
                                 bool want_kt, bool want_kr, bool want_vt, bool want_vr) {
  SharedTiles<A> st;
  if (pr.Bk != 1 || pr.rope_k || pr.B == 1) return st;
  st.on = true;
  st.nkb = (pr.Tk + BK - 1) / BK;
  st.tile = dp * BK;
  const int64_t n = pr.Hk * st.nkb * st.tile;
  if (want_kt) st.kt.reset(new A[n]);
  if (want_kr) st.kr.reset(new A[n]);
  if (want_vt) st.vt.reset(new A[n]);
  if (want_vr) st.vr.reset(new A[n]);
  at::parallel_for(0, pr.Hk * st.nkb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t hk = t / st.nkb, kblk = t % st.nkb, kb = kblk * BK;
      const int nk = static_cast<int>(std::min<int64_t>(BK, pr.Tk - kb));
      auto slot = [&](std::unique_ptr<A[]>& x) { return x ? x.get() + t * st.tile : nullptr; };
      load_kv_tile<T, A, BK>(pr, tab, 0, k + hk * pr.Tk * pr.d, v + hk * pr.Tk * pr.d, kb, nk, dp, slot(st.kt),
                             slot(st.kr), slot(st.vt), slot(st.vr));
    }
  });
  return st;
}

// ---------------------------------------------------------------------------------------------
// Forward. A task is a chunk of QC queries of one (batch, head): each key/value tile is loaded
// (and rotated) once per chunk and reused by its BQ-row sub-tiles.
constexpr int kChunkQueries = 128;

// The key (transposed, dp x BK) and value (BK x dp) tiles a forward thread reads for key block kb
// of (batch b, kv head hk): the shared tiles; or, when consecutive tasks of a thread often read the
// same keys (the query chunks of one (batch, head), the grouped heads of one kv head), the tiles
// of the current (batch, kv head), kept and each prepared on first use; or one tile per block.
template <typename T, typename A, int BK>
class ForwardKvTiles {
 public:
  ForwardKvTiles(const Problem& pr, const RopeTable<A>& tab, const SharedTiles<A>& shared, int64_t dp, int64_t nqc)
      : pr_(pr),
        tab_(tab),
        shared_(shared),
        dp_(dp),
        nkb_((pr.Tk + BK - 1) / BK),
        keep_(!shared.on && (nqc > 1 || pr.group > 1)),
        KT_(shared.on ? 0 : keep_ ? nkb_ * dp * BK : dp * BK),
        Vr_(KT_.size()),
        ready_(keep_ ? nkb_ : 0) {}

  std::pair<const A*, const A*> block(int64_t b, int64_t hk, const T* kbase, const T* vbase, int64_t kb, int nk) {
    const int64_t kblk = kb / BK;
    if (shared_.on) return {shared_.at(shared_.kt, hk, kblk), shared_.at(shared_.vr, hk, kblk)};
    if (!keep_) {
      load_kv_tile<T, A, BK>(pr_, tab_, b, kbase, vbase, kb, nk, dp_, KT_.data(), nullptr, nullptr, Vr_.data());
      return {KT_.data(), Vr_.data()};
    }
    if (kept_b_ != b || kept_hk_ != hk) {
      std::fill(ready_.begin(), ready_.end(), 0);
      kept_b_ = b;
      kept_hk_ = hk;
    }
    A* kt = KT_.data() + kblk * dp_ * BK;
    A* vr = Vr_.data() + kblk * dp_ * BK;
    if (!ready_[kblk]) {  // the whole block: a later chunk may see more of its keys
      load_kv_tile<T, A, BK>(pr_, tab_, b, kbase, vbase, kb, std::min<int64_t>(BK, pr_.Tk - kb), dp_, kt, nullptr,
                             nullptr, vr);
      ready_[kblk] = 1;
    }
    return {kt, vr};
  }

 private:
  const Problem& pr_;
  const RopeTable<A>& tab_;
  const SharedTiles<A>& shared_;
  int64_t dp_, nkb_;
  bool keep_;
  std::vector<A> KT_, Vr_;
  std::vector<char> ready_;
  int64_t kept_b_ = -1, kept_hk_ = -1;
};

// Stages a chunk's nrows query rows (rotated, times qscale) into Qs, zero rows up to a multiple of
// 4, and resets their running max m, lane-form sums l and output rows O.
template <typename T, typename A>
void start_query_chunk(const Problem& pr, const RopeTable<A>& tab, int64_t b, int64_t i0, const T* qbase, int nrows,
                       int64_t dp, A qscale, A* Qs, A* m, A* l, A* O) {
  constexpr int W = Vec<A>::W;
  const int64_t d = pr.d;
  const int nrows4 = static_cast<int>(round_up(nrows, 4));
  for (int r = 0; r < nrows4; ++r) {
    if (r < nrows) {
      const int64_t row = pr.rope_q ? tab.q_row[b] + i0 + r : 0;
      rotate_row<T, A>(qbase + r * d, Qs + r * dp, d, dp, qscale, pr.rope_q ? tab.cos_row(row) : nullptr,
                       pr.rope_q ? tab.sin_row(row) : nullptr, A(1));
    } else {
      std::fill(Qs + r * dp, Qs + (r + 1) * dp, A(0));
    }
    m[r] = -std::numeric_limits<A>::infinity();
    std::fill(l + r * W, l + (r + 1) * W, A(0));
  }
  std::fill(O, O + nrows4 * dp, A(0));
}

// The online-softmax step of a sub-tile: the score rows S (mq rows from chunk row s0, of which nq
// are real; keys kb.. of which nk are real, tile_max their maxima) become powers 2^(s - m) against
// each row's new running max m, the rows' lane-form sums l move to that max and so do their
// output rows O (rescaled). Rows that see no key get zero scores.
template <typename A, int BK>
inline void online_softmax_rows(const Problem& pr, int64_t qp0, int64_t kp0, int64_t kb, int s0, int nq, int mq, int nk,
                                int64_t dp, A* S, const A* tile_max, A* m, A* l, A* O) {
  using V = typename Vec<A>::type;
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int r = 0; r < mq; ++r) {
    A* srow = S + r * BK;
    const int lim = r < nq ? visible_keys(pr, qp0 + s0 + r, kp0 + kb, nk) : 0;
    if (lim <= 0) {
      std::fill(srow, srow + BK, A(0));
      continue;
    }
    const int rr = s0 + r;
    const A mnew = std::max(m[rr], lim >= BK ? tile_max[r] : row_max<A, BK>(srow, lim));
    const A corr = m[rr] == ninf ? A(0) : mnew == m[rr] ? A(1) : std::exp2(m[rr] - mnew);
    A* lrr = l + rr * Vec<A>::W;
    vstore(lrr, vload<V>(lrr) * corr + exp_row<A, BK>(srow, lim, mnew));
    m[rr] = mnew;
    if (corr != A(1))
      for (int64_t c = 0; c < dp; ++c) O[rr * dp + c] *= corr;
  }
}

// Writes a chunk's nrows output rows (O over the row sums) and their logsumexp (natural log) at
// row i0 of (batch b, head h).
template <typename T, typename A>
void finish_query_chunk(const Problem& pr, int64_t b, int64_t h, int64_t i0, int nrows, int64_t dp, const A* O,
                        const A* m, const A* l, T* out, A* lse) {
  const A ln2 = static_cast<A>(0.6931471805599453);
  const int64_t d = pr.d;
  for (int r = 0; r < nrows; ++r) {
    T* orow = out + ((b * pr.Hq + h) * pr.Tq + i0 + r) * d;
    A* lrow = lse + (b * pr.Hq + h) * pr.Tq + i0 + r;
    // l is 0 when the row sees no key; NaN (not > 0) when one of its scores was NaN, or
    // +inf (inf - inf): that row comes out NaN as in the reference
    const A lr = Reduce<A, kVecBytes>::sum(vload<typename Vec<A>::type>(l + r * Vec<A>::W));
    if (lr != A(0)) {
      const A inv = A(1) / lr;
      for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<T>(O[r * dp + c] * inv);
      *lrow = (m[r] + std::log2(lr)) * ln2;
    } else {
      for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<T>(0);
      *lrow = -std::numeric_limits<A>::infinity();
    }
  }
}

template <typename T, typename A, int DP, int BK>
void forward_kernel(const Problem& pr, const T* q, const T* k, const T* v, T* out, A* lse, const RopeTable<A>& tab) {
  // Query sub-tiles of BQ rows keep their BQ x BK score tile within 16 KiB (half of L1) for the
  // softmax passes and the second GEMM: 32 rows for the standard 64-key tile, 8 for 512 keys.
  constexpr int QC = kChunkQueries, BQ = std::min(kTileQueries, 4096 / BK);
  const int64_t d = pr.d, dp = DP > 0 ? DP : padded_head<A>(d);
  const int64_t nqc = (pr.Tq + QC - 1) / QC;
  const A qscale = static_cast<A>(pr.scale * 1.4426950408889634);  // scale * log2(e): base-2 softmax
  const int64_t grain = work_grain(pr.B * pr.Hq * nqc, static_cast<double>(pr.B) * pr.Hq * pr.Tq * pr.Tk * pr.d);
  const SharedTiles<A> shared = make_shared_tiles<T, A, BK>(pr, tab, k, v, dp, true, false, false, true);
  at::parallel_for(0, pr.B * pr.Hq * nqc, grain, [&](int64_t t0, int64_t t1) {
    ForwardKvTiles<T, A, BK> tiles(pr, tab, shared, dp, nqc);
    std::vector<A> Qs(QC * dp), S(BQ * BK), O(QC * dp), m(QC), tile_max(BQ);
    std::vector<A> l(QC * Vec<A>::W);  // row sums in lane form
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qc = task % nqc, h = (task / nqc) % pr.Hq, b = task / (nqc * pr.Hq);
      const int64_t bk = pr.Bk == 1 ? 0 : b, hk = h / pr.group;
      const int64_t i0 = qc * QC;
      const int nrows = static_cast<int>(std::min<int64_t>(QC, pr.Tq - i0));
      const T* kbase = k + (bk * pr.Hk + hk) * pr.Tk * d;
      const T* vbase = v + (bk * pr.Hk + hk) * pr.Tk * d;
      const int64_t qp0 = pr.qpos[b] + i0, kp0 = pr.kpos[b];
      start_query_chunk<T, A>(pr, tab, b, i0, q + ((b * pr.Hq + h) * pr.Tq + i0) * d, nrows, dp, qscale, Qs.data(),
                              m.data(), l.data(), O.data());
      int64_t kend = pr.Tk;
      if (pr.causal) kend = std::max<int64_t>(0, std::min<int64_t>(pr.Tk, qp0 + nrows - kp0));
      for (int64_t kb = 0; kb < kend; kb += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, kend - kb));
        const auto [KTb, Vb] = tiles.block(b, hk, kbase, vbase, kb, nk);
        for (int s0 = 0; s0 < nrows; s0 += BQ) {
          const int nq = std::min(BQ, nrows - s0);
          if (pr.causal && qp0 + s0 + nq - 1 < kp0 + kb) continue;  // no row of this sub-tile sees the block
          const int mq = static_cast<int>(round_up(nq, 4));
          gemm_auto<A, DP>(mq, BK, static_cast<int>(dp), Qs.data() + s0 * dp, dp, 1, KTb, BK, S.data(), BK,
                           false, tile_max.data());
          online_softmax_rows<A, BK>(pr, qp0, kp0, kb, s0, nq, mq, nk, dp, S.data(), tile_max.data(), m.data(),
                                     l.data(), O.data());
          gemm_auto<A, 0>(mq, static_cast<int>(dp), nk, S.data(), BK, 1, Vb, dp, O.data() + s0 * dp, dp, true);
        }
      }
      finish_query_chunk<T, A>(pr, b, h, i0, nrows, dp, O.data(), m.data(), l.data(), out, lse);
    }
  });
}

// Adds a transposed tile of key and value gradients (row c holds channel c of BK keys; keys
// [kb, kb + nk) of batch b, kv head hk) into dk, dv (k's layout; batch 0 when k is shared), turning
// dk back to k's frame (R^T at batch b's key positions) when k is rotated and scaling it by kscale.
template <typename A, int BK>
void add_kv_grad_tile(const Problem& pr, const RopeTable<A>& tab, int64_t b, int64_t hk, int64_t kb, int nk,
                      const A* dKT, const A* dVT, A kscale, A* dk, A* dv) {
  const int64_t d = pr.d;
  const int64_t off = ((pr.Bk == 1 ? 0 : b) * pr.Hk + hk) * pr.Tk * d + kb * d;
  A* dkd = dk + off;
  A* dvd = dv + off;
  for (int j = 0; j < nk; ++j) {
    if (pr.rope_k) {
      const int64_t row = tab.k_row[b] + kb + j;
      const A* cs = tab.cos_row(row);
      const A* sn = tab.sin_row(row);
      for (int64_t i = 0; i < d / 2; ++i) {
        const A g0 = kscale * dKT[(2 * i) * BK + j], g1 = kscale * dKT[(2 * i + 1) * BK + j];
        dkd[j * d + 2 * i] += g0 * cs[i] + g1 * sn[i];
        dkd[j * d + 2 * i + 1] += -g0 * sn[i] + g1 * cs[i];
      }
    } else {
      for (int64_t c = 0; c < d; ++c) dkd[j * d + c] += kscale * dKT[c * BK + j];
    }
    for (int64_t c = 0; c < d; ++c) dvd[j * d + c] += dVT[c * BK + j];
  }
}

// A backward thread's key/value gradient targets: its slice of the per-thread partial sums (k
// shared by the batch) and, with shared tiles, tile-layout accumulators kept over all its tasks.
// Nothing when k and v need no gradient (pr.kv_grad false: a frozen codebook).
template <typename A>
struct KvGradParts {
  bool on;
  std::vector<A> dK_tiles, dV_tiles;
  A* dk_part = nullptr;
  A* dv_part = nullptr;
  KvGradParts(const Problem& pr, bool shared_tiles, int64_t tiles_size, A* dk_out, A* dv_out, int64_t partial_stride,
              int64_t nthreads)
      : on(pr.kv_grad),
        dK_tiles(on && shared_tiles ? tiles_size : 0, A(0)),
        dV_tiles(on && shared_tiles ? tiles_size : 0, A(0)) {
    if (!on) return;
    const int64_t tid = pr.Bk == 1 ? at::get_thread_num() : 0;
    TORCH_CHECK(tid < nthreads, "rope_attention backward: unexpected thread index");
    dk_part = dk_out + tid * partial_stride;
    dv_part = dv_out + tid * partial_stride;
  }
  // Adds the tile-layout accumulators (nkb key blocks of width x BK per kv head) into this
  // thread's partial sums, once at the end of its tasks. Shared tiles mean k is not rotated.
  template <int BK>
  void add_shared_tiles(const Problem& pr, const RopeTable<A>& tab, int64_t nkb, int64_t width, A kscale) {
    if (!on || dK_tiles.empty()) return;
    for (int64_t hk = 0; hk < pr.Hk; ++hk)
      for (int64_t kblk = 0; kblk < nkb; ++kblk) {
        const int64_t kb = kblk * BK, at = (hk * nkb + kblk) * width * BK;
        const int nk = static_cast<int>(std::min<int64_t>(BK, pr.Tk - kb));
        add_kv_grad_tile<A, BK>(pr, tab, 0, hk, kb, nk, dK_tiles.data() + at, dV_tiles.data() + at, kscale, dk_part,
                                dv_part);
      }
  }
};

// What a backward task (one query batch b and kv head hk) reads: its keys' batch bk, the absolute
// positions of its first query and key, and the offset of its keys and values in k and v.
struct BackwardTask {
  int64_t hk, b, bk, qs, ks, kvbase;
  BackwardTask(const Problem& pr, int64_t task)
      : hk(task % pr.Hk),
        b(task / pr.Hk),
        bk(pr.Bk == 1 ? 0 : b),
        qs(pr.qpos[b]),
        ks(pr.kpos[b]),
        kvbase((bk * pr.Hk + hk) * pr.Tk * pr.d) {}
};

// Stages a backward task's rows (query batch b, kv head hk), for each of its grouped query heads
// g at rows g * rows_per_group + i: the query rotated and scaled by qscale (scale * log2 e, the
// base-2 softmax), the output gradient, the row's lse in base 2 and D = rowsum(dO * O). Rows from
// Tq up to rows_per_group (a kernel's padding) are zero; each row is width wide, zero-padded.
template <typename T, typename A>
void stage_task_rows(const Problem& pr, const RopeTable<A>& tab, int64_t b, int64_t hk, const T* q, const T* gout,
                     const A* lse, const A* Drow, int64_t rows_per_group, int64_t width, A qscale, A* Qs, A* dO,
                     A* L, A* Dv) {
  const int64_t d = pr.d;
  const A log2e = static_cast<A>(1.4426950408889634);
  for (int64_t g = 0; g < pr.group; ++g) {
    const int64_t rowbase = (b * pr.Hq + hk * pr.group + g) * pr.Tq;
    for (int64_t i = 0; i < rows_per_group; ++i) {
      const int64_t ro = g * rows_per_group + i;
      A* qrow = Qs + ro * width;
      A* orow = dO + ro * width;
      if (i < pr.Tq) {
        const int64_t row = pr.rope_q ? tab.q_row[b] + i : 0;
        rotate_row<T, A>(q + (rowbase + i) * d, qrow, d, width, qscale, pr.rope_q ? tab.cos_row(row) : nullptr,
                         pr.rope_q ? tab.sin_row(row) : nullptr, A(1));
        rotate_row<T, A>(gout + (rowbase + i) * d, orow, d, width, A(1), nullptr, nullptr, A(1));
        L[ro] = lse[rowbase + i] * log2e;
        Dv[ro] = Drow[rowbase + i];
      } else {
        std::fill(qrow, qrow + width, A(0));
        std::fill(orow, orow + width, A(0));
      }
    }
  }
}

// A backward thread's key/value tiles for key block kblk of a task: k^T, R k and v^T (shared by
// the batch, or loaded for this task's batch into the thread's buffers), and where the block's
// dk^T, dv^T go (the thread's tile-layout accumulators with shared tiles, else zeroed buffers).
template <typename A>
struct BackwardKvTiles {
  const A *kt, *kr, *vt;
  A *dkt, *dvt;
};

template <typename T, typename A, int BK>
BackwardKvTiles<A> backward_kv_block(const Problem& pr, const RopeTable<A>& tab, const SharedTiles<A>& shared,
                                           const BackwardTask& t, const T* k, const T* v, int64_t kblk, int nk,
                                           int64_t dp, int64_t nkb, bool kv, KvGradParts<A>& acc, std::vector<A>& KT,
                                           std::vector<A>& Kr, std::vector<A>& VT, std::vector<A>& dKT,
                                           std::vector<A>& dVT) {
  BackwardKvTiles<A> tiles{KT.data(), Kr.data(), VT.data(), dKT.data(), dVT.data()};
  if (shared.on) {
    tiles.kt = shared.at(shared.kt, t.hk, kblk);
    tiles.kr = shared.at(shared.kr, t.hk, kblk);
    tiles.vt = shared.at(shared.vt, t.hk, kblk);
  } else {
    load_kv_tile<T, A, BK>(pr, tab, t.b, k + t.kvbase, v + t.kvbase, kblk * BK, nk, dp, KT.data(), Kr.data(),
                           VT.data(), nullptr);
  }
  if (kv && shared.on) {
    tiles.dkt = acc.dK_tiles.data() + (t.hk * nkb + kblk) * dp * BK;
    tiles.dvt = acc.dV_tiles.data() + (t.hk * nkb + kblk) * dp * BK;
  } else if (kv) {
    std::fill(dKT.begin(), dKT.end(), A(0));
    std::fill(dVT.begin(), dVT.end(), A(0));
  }
  return tiles;
}

// One query tile of the backward (nq rows from staged row ro, absolute query position qpos0)
// against a key block (keys from absolute position kpos0, nk real): P = 2^(S - lse) and
// dS = P (dP - D) in the S, dP buffers, then dV^T += dO^T P and dK^T += q^T dS (when kv) and
// dQ += dS (R k).
template <typename A, int DP, int BK>
inline void backward_query_tile(const Problem& pr, const BackwardKvTiles<A>& tiles, int64_t qpos0, int64_t kpos0,
                                int nq, int nk, int64_t ro, int64_t dp, const A* Qs, const A* dO, const A* L,
                                const A* Dv, A* dQ, A* S, A* dP, bool kv) {
  const int mq = static_cast<int>(round_up(nq, 4));
  const A* Qt = Qs + ro * dp;
  const A* dOt = dO + ro * dp;
  gemm_auto<A, DP>(mq, BK, static_cast<int>(dp), Qt, dp, 1, tiles.kt, BK, S, BK, false);
  gemm_auto<A, DP>(mq, BK, static_cast<int>(dp), dOt, dp, 1, tiles.vt, BK, dP, BK, false);
  for (int r = 0; r < mq; ++r) {
    A* srow = S + r * BK;
    A* dprow = dP + r * BK;
    const int lim = r < nq ? visible_keys(pr, qpos0 + r, kpos0, nk) : 0;
    if (lim <= 0) {
      std::fill(srow, srow + BK, A(0));
      std::fill(dprow, dprow + BK, A(0));
      continue;
    }
    exp_row<A, BK>(srow, lim, L[ro + r]);
    const A Di = Dv[ro + r];
    for (int j = 0; j < BK; ++j) dprow[j] = srow[j] * (dprow[j] - Di);  // dS
  }
  if (kv) {
    gemm_auto<A, 0>(static_cast<int>(dp), BK, mq, dOt, 1, dp, S, BK, tiles.dvt, BK, true);
    gemm_auto<A, 0>(static_cast<int>(dp), BK, mq, Qt, 1, dp, dP, BK, tiles.dkt, BK, true);
  }
  gemm_auto<A, 0>(mq, static_cast<int>(dp), nk, dP, BK, 1, tiles.kr, dp, dQ + ro * dp, dp, true);
}

// Writes a task's dq rows: row i of grouped head g is staged at g * rows_per_group + i of dQ
// (width wide), in the rotated frame and without the softmax scale; R^T and the scale are applied.
template <typename T, typename A>
void write_dq_rows(const Problem& pr, const RopeTable<A>& tab, int64_t b, int64_t hk, const A* dQ,
                   int64_t rows_per_group, int64_t width, T* dq) {
  const int64_t d = pr.d;
  for (int64_t g = 0; g < pr.group; ++g) {
    const int64_t rowbase = (b * pr.Hq + hk * pr.group + g) * pr.Tq;
    for (int64_t i = 0; i < pr.Tq; ++i) {
      const int64_t row = pr.rope_q ? tab.q_row[b] + i : 0;
      A tmp[kMaxPaddedHead];
      rotate_row<A, A>(dQ + (g * rows_per_group + i) * width, tmp, d, d, static_cast<A>(pr.scale),
                       pr.rope_q ? tab.cos_row(row) : nullptr, pr.rope_q ? tab.sin_row(row) : nullptr, A(-1));
      T* dst = dq + (rowbase + i) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(tmp[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, one pass (flash-attention-2 style). A task is one (query batch b, kv head hk): it
// owns dq for the grouped query heads of (b, hk), and dk, dv of (b, hk) when k is not shared.
// Its queries and output gradients are rotated and staged once; for each key block, each
// query tile recomputes P = exp(S - lse) (base 2: q staged with scale * log2 e) and forms
// dS = P * (dP - D), then dV += P^T dO,  dK += dS^T (scale R q) (the ln 2 applied on write-out),
// dQ += dS (R k).
// With a shared k (Bk == 1) the dk, dv of a task are added into per-thread partial sums that are
// reduced at the end; at::parallel_for hands each thread a fixed contiguous range of tasks, so
// the summation order, and the result, is the same run to run for a given thread count.
template <typename T, typename A, int DP>
void backward_kernel(const Problem& pr, const T* gout, const T* q, const T* k, const T* v, const A* lse,
                     const A* Drow, T* dq, A* dk_out, A* dv_out, int64_t partial_stride, int64_t nthreads,
                     const RopeTable<A>& tab, int64_t grain) {
  constexpr int BQ = kTileQueries, BK = kTileKeys;
  const int64_t d = pr.d, dp = DP > 0 ? DP : padded_head<A>(d);
  const int64_t nkb = (pr.Tk + BK - 1) / BK;
  const int64_t tq4 = round_up(pr.Tq, 4);
  const A log2e = static_cast<A>(1.4426950408889634), ln2 = static_cast<A>(0.6931471805599453);
  const SharedTiles<A> shared = make_shared_tiles<T, A, BK>(pr, tab, k, v, dp, true, true, true, false);
  // A query tile starts at the first row that sees the key block (any row, not a multiple of 4)
  // and spans mq = round_up(nq, 4) rows, so it can run up to 3 rows past the last group's staged
  // rows: those padding rows stay zero (found by the ASan build, .ci/sanitize.sh).
  const int64_t staged = (pr.group * tq4 + 3) * dp;
  at::parallel_for(0, pr.B * pr.Hk, grain, [&](int64_t t0, int64_t t1) {
    std::vector<A> Qs(staged), dO(staged), dQ(staged), L(pr.group * tq4), Dv(pr.group * tq4);
    const int64_t kv_tile = shared.on ? 0 : dp * BK;
    std::vector<A> KT(kv_tile), Kr(kv_tile), VT(kv_tile), S(BQ * BK), dP(BQ * BK), dKT(kv_tile), dVT(kv_tile);
    // With shared tiles (k shared and not rotated), this thread's dk^T, dv^T stay in tile layout
    // across all its tasks: the gemms accumulate into them directly and the transpose back to
    // k's layout happens once per thread instead of once per task and key block.
    KvGradParts<A> acc(pr, shared.on, pr.Hk * nkb * dp * BK, dk_out, dv_out, partial_stride, nthreads);
    const bool kv = acc.on;
    for (int64_t task = t0; task < t1; ++task) {
      const BackwardTask t(pr, task);
      stage_task_rows<T, A>(pr, tab, t.b, t.hk, q, gout, lse, Drow, tq4, dp, static_cast<A>(pr.scale) * log2e,
                            Qs.data(), dO.data(), L.data(), Dv.data());
      std::fill(dQ.begin(), dQ.end(), A(0));
      for (int64_t kblk = 0; kblk < nkb; ++kblk) {
        const int64_t kb = kblk * BK;
        const int nk = static_cast<int>(std::min<int64_t>(BK, pr.Tk - kb));
        const int64_t qstart = pr.causal ? std::max<int64_t>(0, t.ks + kb - t.qs) : 0;  // first row seeing key kb
        if (qstart >= pr.Tq) break;
        const BackwardKvTiles<A> tiles =
            backward_kv_block<T, A, BK>(pr, tab, shared, t, k, v, kblk, nk, dp, nkb, kv, acc, KT, Kr, VT, dKT, dVT);
        for (int64_t g = 0; g < pr.group; ++g)
          for (int64_t i0 = qstart; i0 < pr.Tq; i0 += BQ)
            backward_query_tile<A, DP, BK>(pr, tiles, t.qs + i0, t.ks + kb,
                                           static_cast<int>(std::min<int64_t>(BQ, pr.Tq - i0)), nk, g * tq4 + i0, dp,
                                           Qs.data(), dO.data(), L.data(), Dv.data(), dQ.data(), S.data(), dP.data(),
                                           kv);
        if (shared.on || !kv) continue;  // shared: accumulated in this thread's tiles, written out at the end
        add_kv_grad_tile<A, BK>(pr, tab, t.b, t.hk, kb, nk, dKT.data(), dVT.data(), ln2, acc.dk_part, acc.dv_part);
      }
      write_dq_rows<T, A>(pr, tab, t.b, t.hk, dQ.data(), tq4, dp, dq);
    }
    acc.template add_shared_tiles<BK>(pr, tab, nkb, dp, ln2);
  });
}

// ---------------------------------------------------------------------------------------------
// Forward for small head sizes (d <= 16) over many keys, keys along the vector lanes. With d = 8 a row-major
// tile wastes half of an AVX-512 vector (or pads d), and the score matrix makes three trips
// through memory (GEMM out, max, exp); here a query row meets a block of NV vectors of keys held
// in registers: scores s = q . K^T (d broadcast FMAs per vector), p = 2^(s - m) against the row's
// reference m (below) and the PV product accumulated per value channel in lane form (d FMAs per vector), reduced across
// lanes once per row. The scale and log2(e) are folded into the staged query, so the softmax runs
// in base 2; lse is converted back to natural log on output.
// Key/value tiles are the (d x BK) transposed layout: shared by the batch when k is (codebook),
// otherwise a per-thread copy of the current (batch, kv head), filled as far as the keys needed.
// Which head sizes and key counts take it: lanes_forward() (rope_attention_cpu.cpp).
// Rows take a fixed reference m = |q| max_j |k_j| (Cauchy-Schwarz: no score exceeds it; RoPE keeps
// norms) instead of a running max: no per-block max, horizontal reduction or rescale. It is exact
// while the row's largest power 2^(s_max - m) stays far from underflow: a row whose sum falls
// below kMinBoundedSum (or whose bound is not finite: inf or NaN inputs) is redone with the
// running max. Above it the largest power is >= 2^-60 / Tk, so a power that underflows weighs
// under 2^-46 of it in float (double underflows 2^-1022 down): below rounding.
constexpr double kMinBoundedSum = 0x1p-60;

// The largest squared norm of the keys of a transposed (D x BK) tile; NaN keys are skipped (their
// scores are NaN, which the row sum reports), padding keys are 0.
template <typename A, int D, int BK>
inline A block_key_norm2(const A* kt) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  V mx = V{};
  for (int j = 0; j < BK; j += W) {
    V ss = V{};
    for (int c = 0; c < D; ++c) {
      const V x = vload<V>(kt + c * BK + j);
      ss += x * x;
    }
    mx = ss > mx ? ss : mx;
  }
  return Reduce<A, kVecBytes>::max(mx);
}

constexpr int kLaneBlockVectors = 4;  // key vectors per block: scores stay in registers (4 and 8 timed alike)
// The backward's sweeps spill with AVX2's 16 registers: the tile GEMM backward is faster there.
constexpr int kLanesBackwardMaxHead = kManyRegisters ? 8 : 0;
constexpr int kLanesRowChunk = 64;  // backward: rows whose dS (64 x BK) stay in L1 between sweeps

// Where the transposed (D x BK) key and value tiles of key block kblk of kv head hk are: the
// shared tiles, or a forward thread's copy of its current (batch, kv head), filled as far as the
// keys its rows need; with the largest squared key norm over them (the bound's max |k|^2).
template <typename T, typename A, int D>
class LanesKvTiles {
 public:
  static constexpr int BK = kLaneBlockVectors * Vec<A>::W;
  LanesKvTiles(const Problem& pr, const RopeTable<A>& tab, const SharedTiles<A>& shared, const A* shared_kn2)
      : pr_(pr),
        tab_(tab),
        shared_(shared),
        shared_kn2_(shared_kn2),
        KT_(shared.on ? 0 : (pr.Tk + BK - 1) / BK * D * BK),
        VT_(KT_.size()) {}

  // Makes keys [0, kend) of (batch b, kv head hk) readable; returns their largest squared norm.
  A prepare(int64_t b, int64_t hk, const T* k, const T* v, int64_t kend) {
    if (shared_.on) return shared_kn2_[hk];
    if (cached_b_ != b || cached_hk_ != hk) {
      cached_b_ = b;
      cached_hk_ = hk;
      cached_blocks_ = 0;
      cached_kn2_ = A(0);
    }
    const int64_t off = ((pr_.Bk == 1 ? 0 : b) * pr_.Hk + hk) * pr_.Tk * pr_.d;
    for (; cached_blocks_ * BK < kend; ++cached_blocks_) {
      const int64_t kb = cached_blocks_ * BK;
      A* kt = KT_.data() + cached_blocks_ * D * BK;
      load_kv_tile<T, A, BK>(pr_, tab_, b, k + off, v + off, kb, std::min<int64_t>(BK, pr_.Tk - kb), D, kt, nullptr,
                             VT_.data() + cached_blocks_ * D * BK, nullptr);
      cached_kn2_ = std::max(cached_kn2_, block_key_norm2<A, D, BK>(kt));
    }
    return cached_kn2_;
  }
  const A* kt(int64_t hk, int64_t kblk) const {
    return shared_.on ? shared_.at(shared_.kt, hk, kblk) : KT_.data() + kblk * D * BK;
  }
  const A* vt(int64_t hk, int64_t kblk) const {
    return shared_.on ? shared_.at(shared_.vt, hk, kblk) : VT_.data() + kblk * D * BK;
  }

 private:
  const Problem& pr_;
  const RopeTable<A>& tab_;
  const SharedTiles<A>& shared_;
  const A* shared_kn2_;
  std::vector<A> KT_, VT_;
  int64_t cached_b_ = -1, cached_hk_ = -1, cached_blocks_ = 0;
  A cached_kn2_ = A(0);
};

// Query row qrow against keys [0, kend_r) of kv head hk; returns the reference max m of its
// powers p = 2^(s - m), summed into lsum and (times v) into acc, in lane form. kBound: m is
// m_fixed for the whole row (no max, no rescale); otherwise the running max of each block.
template <bool kBound, typename T, typename A, int D>
__attribute__((always_inline)) inline A attend_row_lanes(const LanesKvTiles<T, A, D>& tiles, const A* qrow,
                                                         int64_t hk, int64_t kend_r, A m_fixed,
                                                         typename Vec<A>::type* acc, typename Vec<A>::type& lsum) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W, NV = kLaneBlockVectors, BK = NV * W;
  const A ninf = -std::numeric_limits<A>::infinity();
  V qv[D];
  for (int c = 0; c < D; ++c) {
    qv[c] = V{} + qrow[c];
    acc[c] = V{};
  }
  lsum = V{};
  A m = kBound ? m_fixed : ninf;
  for (int64_t kb = 0; kb < kend_r; kb += BK) {
    const int64_t kblk = kb / BK;
    const int nk = static_cast<int>(std::min<int64_t>(BK, kend_r - kb));
    const A* kt = tiles.kt(hk, kblk);
    const A* vt = tiles.vt(hk, kblk);
    // fully unrolled, so that the scores and accumulators live in registers
    V s[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {  // two partial sums: shorter FMA latency chains
      V s1 = qv[1] * vload<V>(kt + BK + j * W);
      s[j] = qv[0] * vload<V>(kt + j * W);
#pragma GCC unroll 16
      for (int c = 2; c < D; c += 2) {
        s[j] += qv[c] * vload<V>(kt + c * BK + j * W);
        s1 += qv[c + 1] * vload<V>(kt + (c + 1) * BK + j * W);
      }
      s[j] += s1;
    }
    if (nk < BK)
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) s[j] = Vec<A>::iota() + j * W < nk ? s[j] : V{} + ninf;
    if (!kBound) {
      V mx = s[0];
#pragma GCC unroll 16
      for (int j = 1; j < NV; ++j) mx = s[j] > mx ? s[j] : mx;
      const A bm = Reduce<A, kVecBytes>::max(mx);
      if (bm > m) {  // rescale what was summed against the old maximum (2^-inf = 0 at the start)
        const A corr = std::exp2(m - bm);
#pragma GCC unroll 16
        for (int c = 0; c < D; ++c) acc[c] *= corr;
        lsum *= corr;
        m = bm;
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      V p = vexp2(s[j] - m);
      if (nk < BK) p = Vec<A>::iota() + j * W < nk ? p : V{};
      lsum += p;
#pragma GCC unroll 16
      for (int c = 0; c < D; ++c) acc[c] += p * vload<V>(vt + c * BK + j * W);
    }
  }
  return m;
}

// One query row of the key-lane forward: attends with the bound reference when it is finite and
// keeps that result unless the row's sum fell below kMinBoundedSum, else with the running max;
// writes the output row and its logsumexp (natural log).
template <typename T, typename A, int D>
inline void forward_lanes_row(const Problem& pr, const LanesKvTiles<T, A, D>& tiles, const A* qrow, int64_t hk,
                              int64_t kend_r, A kn2, T* orow, A* lrow) {
  using V = typename Vec<A>::type;
  const A ninf = -std::numeric_limits<A>::infinity();
  A qn2 = A(0);
  for (int c = 0; c < D; ++c) qn2 += qrow[c] * qrow[c];
  const A bound = std::sqrt(qn2 * kn2);
  V acc[D], lsum;
  A m = ninf, l = A(0);
  bool done = false;
  if (std::isfinite(bound)) {
    m = attend_row_lanes<true>(tiles, qrow, hk, kend_r, bound, acc, lsum);
    l = Reduce<A, kVecBytes>::sum(lsum);
    done = l >= static_cast<A>(kMinBoundedSum);
  }
  if (!done) {
    m = attend_row_lanes<false>(tiles, qrow, hk, kend_r, ninf, acc, lsum);
    l = Reduce<A, kVecBytes>::sum(lsum);
  }
  // l is 0 when the row sees no key, NaN when one of its scores was NaN (as in exp_row's users)
  if (l != A(0)) {
    const A inv = A(1) / l;
    for (int64_t c = 0; c < pr.d; ++c) orow[c] = static_cast<T>(Reduce<A, kVecBytes>::sum(acc[c]) * inv);
    *lrow = (m + std::log2(l)) * static_cast<A>(0.6931471805599453);
  } else {
    for (int64_t c = 0; c < pr.d; ++c) orow[c] = static_cast<T>(0);
    *lrow = ninf;
  }
}

template <typename T, typename A, int D>
void forward_lanes_kernel(const Problem& pr, const T* q, const T* k, const T* v, T* out, A* lse,
                          const RopeTable<A>& tab) {
  constexpr int W = Vec<A>::W, NV = kLaneBlockVectors, BK = NV * W, QC = kChunkQueries;
  const int64_t d = pr.d;
  const int64_t nqc = (pr.Tq + QC - 1) / QC;
  const int64_t nkb = (pr.Tk + BK - 1) / BK;
  const A qscale = static_cast<A>(pr.scale * 1.4426950408889634);  // scale * log2(e)
  const int64_t grain = work_grain(pr.B * pr.Hq * nqc, static_cast<double>(pr.B) * pr.Hq * pr.Tq * pr.Tk * pr.d);
  const SharedTiles<A> shared = make_shared_tiles<T, A, BK>(pr, tab, k, v, D, true, false, true, false);
  std::vector<A> shared_kn2(shared.on ? pr.Hk : 0, A(0));  // largest squared key norm per kv head
  for (int64_t hk = 0; hk < static_cast<int64_t>(shared_kn2.size()); ++hk)
    for (int64_t kblk = 0; kblk < nkb; ++kblk)
      shared_kn2[hk] = std::max(shared_kn2[hk], block_key_norm2<A, D, BK>(shared.at(shared.kt, hk, kblk)));
  at::parallel_for(0, pr.B * pr.Hq * nqc, grain, [&](int64_t t0, int64_t t1) {
    LanesKvTiles<T, A, D> tiles(pr, tab, shared, shared_kn2.data());
    std::vector<A> Qs(QC * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qc = task % nqc, h = (task / nqc) % pr.Hq, b = task / (nqc * pr.Hq);
      const int64_t hk = h / pr.group;
      const int64_t i0 = qc * QC;
      const int nrows = static_cast<int>(std::min<int64_t>(QC, pr.Tq - i0));
      const T* qbase = q + ((b * pr.Hq + h) * pr.Tq + i0) * d;
      const int64_t qp0 = pr.qpos[b] + i0, kp0 = pr.kpos[b];
      for (int r = 0; r < nrows; ++r) {
        const int64_t row = pr.rope_q ? tab.q_row[b] + i0 + r : 0;
        rotate_row<T, A>(qbase + r * d, Qs.data() + r * D, d, D, qscale, pr.rope_q ? tab.cos_row(row) : nullptr,
                         pr.rope_q ? tab.sin_row(row) : nullptr, A(1));
      }
      int64_t kend = pr.Tk;  // keys any row of the chunk sees
      if (pr.causal) kend = std::max<int64_t>(0, std::min<int64_t>(pr.Tk, qp0 + nrows - kp0));
      // every key a row of this chunk sees is prepared: its norm is within the bound
      const A kn2 = tiles.prepare(b, hk, k, v, kend);
      for (int r = 0; r < nrows; ++r) {
        int64_t kend_r = pr.Tk;
        if (pr.causal) kend_r = std::max<int64_t>(0, std::min<int64_t>(pr.Tk, qp0 + r - kp0 + 1));
        forward_lanes_row<T, A, D>(pr, tiles, Qs.data() + r * D, hk, kend_r, kn2,
                                   out + ((b * pr.Hq + h) * pr.Tq + i0 + r) * d, lse + (b * pr.Hq + h) * pr.Tq + i0 + r);
      }
    }
  });
}

// The key-lane backward's per-thread state for one key block and chunk of rows.
template <typename A>
struct LanesBackwardBlock {
  const A* kt;     // K^T tile (D x BK)
  const A* vt;     // V^T tile
  A* dkt;          // where dK^T of the block accumulates
  A* dvt;          // where dV^T of the block accumulates
  A* DS;           // dS of the chunk's rows (kLanesRowChunk x BK)
  const int* lim;  // visible keys of each row of the chunk
};

// Sweep 1, one key vector at a time (its K^T, V^T columns in registers) over the chunk's nr rows
// from staged row ro0: s = q . K^T, p = 2^(s - lse), dp = dO . V^T, dS = p (dp - D) into the
// chunk's dS, and (when kv) dV^T += p dO, summed in registers over the rows.
template <typename A, int D>
__attribute__((always_inline)) inline void lanes_sweep_scores(const LanesBackwardBlock<A>& blk, int nr, int64_t ro0,
                                                              const A* Qs, const A* dO, const A* L, const A* Dv,
                                                              bool kv) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W, NV = kLaneBlockVectors, BK = NV * W;
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) {
    V kc[D], vc[D], dv[D];
#pragma GCC unroll 16
    for (int c = 0; c < D; ++c) {
      kc[c] = vload<V>(blk.kt + c * BK + j * W);
      vc[c] = vload<V>(blk.vt + c * BK + j * W);
      dv[c] = V{};
    }
    for (int r = 0; r < nr; ++r) {
      A* dsrow = blk.DS + r * BK + j * W;
      if (j * W >= blk.lim[r]) {  // no visible key in this vector
        vstore(dsrow, V{});
        continue;
      }
      const A* qr = Qs + (ro0 + r) * D;
      const A* orow = dO + (ro0 + r) * D;
      // two partial sums each: halves the FMA latency chains a row waits on
      V sc = qr[0] * kc[0], dp = orow[0] * vc[0], sc1 = qr[1] * kc[1], dp1 = orow[1] * vc[1];
#pragma GCC unroll 16
      for (int c = 2; c < D; c += 2) {
        sc += qr[c] * kc[c];
        dp += orow[c] * vc[c];
        sc1 += qr[c + 1] * kc[c + 1];
        dp1 += orow[c + 1] * vc[c + 1];
      }
      sc += sc1;
      dp += dp1;
      V p = vexp2(sc - L[ro0 + r]);
      if (blk.lim[r] < BK) p = Vec<A>::iota() + j * W < blk.lim[r] ? p : V{};
      vstore(dsrow, p * (dp - Dv[ro0 + r]));
      if (!kv) continue;
#pragma GCC unroll 16
      for (int c = 0; c < D; ++c) dv[c] += p * orow[c];
    }
    if (!kv) continue;
#pragma GCC unroll 16
    for (int c = 0; c < D; ++c) vstore(blk.dvt + c * BK + j * W, vload<V>(blk.dvt + c * BK + j * W) + dv[c]);
  }
}

// Sweep 2: dK^T += dS^T q, again per key vector in registers.
template <typename A, int D>
__attribute__((always_inline)) inline void lanes_sweep_dk(const LanesBackwardBlock<A>& blk, int nr, int64_t ro0,
                                                          const A* Qs) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W, NV = kLaneBlockVectors, BK = NV * W;
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) {
    V dk[D];
#pragma GCC unroll 16
    for (int c = 0; c < D; ++c) dk[c] = V{};
    for (int r = 0; r < nr; ++r) {
      const V ds = vload<V>(blk.DS + r * BK + j * W);
      const A* qr = Qs + (ro0 + r) * D;
#pragma GCC unroll 16
      for (int c = 0; c < D; ++c) dk[c] += ds * qr[c];
    }
#pragma GCC unroll 16
    for (int c = 0; c < D; ++c) vstore(blk.dkt + c * BK + j * W, vload<V>(blk.dkt + c * BK + j * W) + dk[c]);
  }
}

// dQ += dS K, per row in lane accumulators (dQacc: D x W per staged row, reduced once per task).
template <typename A, int D>
__attribute__((always_inline)) inline void lanes_accumulate_dq(const LanesBackwardBlock<A>& blk, int nr, int64_t ro0,
                                                               A* dQacc) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W, NV = kLaneBlockVectors, BK = NV * W;
  for (int r = 0; r < nr; ++r) {
    A* acc = dQacc + (ro0 + r) * D * W;
    V dqa[D];
#pragma GCC unroll 16
    for (int c = 0; c < D; ++c) dqa[c] = vload<V>(acc + c * W);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      const V ds = vload<V>(blk.DS + r * BK + j * W);
#pragma GCC unroll 16
      for (int c = 0; c < D; ++c) dqa[c] += ds * vload<V>(blk.kt + c * BK + j * W);
    }
#pragma GCC unroll 16
    for (int c = 0; c < D; ++c) vstore(acc + c * W, dqa[c]);
  }
}

// Backward for head sizes up to 8, keys along the lanes as in forward_lanes_kernel. Tasks and the
// dk, dv partial sums are those of backward_kernel. Per key block and chunk of query rows:
//   sweep 1, per key vector (its K^T, V^T columns in registers) over the rows: s = q . K^T,
//     p = 2^(s - lse log2 e), dp = dO . V^T, dS = p (dp - D) (kept for the chunk), dV^T += p dO;
//   sweep 2, per key vector over the rows: dK^T += dS q;
//   per row: dQ += dS K in lane accumulators, reduced across lanes once per task.
// The dK^T, dV^T sums stay in registers across the rows of a chunk: updating them in memory
// for every row made the kernel store-bound. q is staged with scale * log2(e) folded in; dK gets
// the ln 2 back when its tile is written out.
template <typename T, typename A, int D>
void backward_lanes_kernel(const Problem& pr, const T* gout, const T* q, const T* k, const T* v, const A* lse,
                           const A* Drow, T* dq, A* dk_out, A* dv_out, int64_t partial_stride, int64_t nthreads,
                           const RopeTable<A>& tab, int64_t grain) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W, NV = kLaneBlockVectors, BK = NV * W;
  const int64_t tq = pr.Tq;
  const int64_t nkb = (pr.Tk + BK - 1) / BK;
  const A qscale = static_cast<A>(pr.scale) * static_cast<A>(1.4426950408889634);
  const A ln2 = static_cast<A>(0.6931471805599453);
  const SharedTiles<A> shared = make_shared_tiles<T, A, BK>(pr, tab, k, v, D, true, false, true, false);
  at::parallel_for(0, pr.B * pr.Hk, grain, [&](int64_t t0, int64_t t1) {
    const int64_t rows = pr.group * tq;
    std::vector<A> Qs(rows * D), dO(rows * D), L(rows), Dv(rows), dQacc(rows * D * W), dQ(rows * D);
    const int64_t kv_tile = shared.on ? 0 : D * BK;
    std::vector<A> KT(kv_tile), VT(kv_tile), dKT(kv_tile), dVT(kv_tile), DS(kLanesRowChunk * BK);
    std::vector<int> lim(kLanesRowChunk);
    // shared k: this thread's dk^T, dv^T stay in tile layout over all its tasks (as backward_kernel)
    KvGradParts<A> acc(pr, shared.on, pr.Hk * nkb * D * BK, dk_out, dv_out, partial_stride, nthreads);
    const bool kv = acc.on;
    for (int64_t task = t0; task < t1; ++task) {
      const BackwardTask t(pr, task);
      stage_task_rows<T, A>(pr, tab, t.b, t.hk, q, gout, lse, Drow, tq, D, qscale, Qs.data(), dO.data(), L.data(),
                            Dv.data());
      std::fill(dQacc.begin(), dQacc.end(), A(0));
      for (int64_t kblk = 0; kblk < nkb; ++kblk) {
        const int64_t kb = kblk * BK;
        const int nk = static_cast<int>(std::min<int64_t>(BK, pr.Tk - kb));
        const int64_t qstart = pr.causal ? std::max<int64_t>(0, t.ks + kb - t.qs) : 0;  // first row seeing key kb
        if (qstart >= tq) break;
        LanesBackwardBlock<A> blk{KT.data(), VT.data(), dKT.data(), dVT.data(), DS.data(), lim.data()};
        if (shared.on) {
          blk.kt = shared.at(shared.kt, t.hk, kblk);
          blk.vt = shared.at(shared.vt, t.hk, kblk);
          if (kv) {
            blk.dkt = acc.dK_tiles.data() + (t.hk * nkb + kblk) * D * BK;
            blk.dvt = acc.dV_tiles.data() + (t.hk * nkb + kblk) * D * BK;
          }
        } else {
          load_kv_tile<T, A, BK>(pr, tab, t.b, k + t.kvbase, v + t.kvbase, kb, nk, D, KT.data(), nullptr, VT.data(),
                                 nullptr);
          std::fill(dKT.begin(), dKT.end(), A(0));
          std::fill(dVT.begin(), dVT.end(), A(0));
        }
        for (int64_t g = 0; g < pr.group; ++g) {
          for (int64_t r0 = qstart; r0 < tq; r0 += kLanesRowChunk) {
            const int nr = static_cast<int>(std::min<int64_t>(kLanesRowChunk, tq - r0));
            const int64_t ro0 = g * tq + r0;
            for (int r = 0; r < nr; ++r) lim[r] = visible_keys(pr, t.qs + r0 + r, t.ks + kb, nk);
            lanes_sweep_scores<A, D>(blk, nr, ro0, Qs.data(), dO.data(), L.data(), Dv.data(), kv);
            if (kv) lanes_sweep_dk<A, D>(blk, nr, ro0, Qs.data());
            lanes_accumulate_dq<A, D>(blk, nr, ro0, dQacc.data());
          }
        }
        if (!shared.on && kv)
          add_kv_grad_tile<A, BK>(pr, tab, t.b, t.hk, kb, nk, dKT.data(), dVT.data(), ln2, acc.dk_part, acc.dv_part);
      }
      for (int64_t ro = 0; ro < rows; ++ro)  // lane sums, then R^T and the scale as backward_kernel's
        for (int c = 0; c < D; ++c) dQ[ro * D + c] = Reduce<A, kVecBytes>::sum(vload<V>(dQacc.data() + (ro * D + c) * W));
      write_dq_rows<T, A>(pr, tab, t.b, t.hk, dQ.data(), tq, D, dq);
    }
    acc.template add_shared_tiles<BK>(pr, tab, nkb, D, ln2);
  });
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


// Entry points of this instruction set (the accumulation type is the input type here).
// The widest key tile among 512, 256, 128 whose padding of Tk keys stays within 1/8 (0: none,
// fewer than 512 keys keep the standard tile).
inline int64_t wide_key_tile(int64_t Tk) {
  if (Tk < 8 * kTileKeys) return 0;
  for (int64_t bk : {8 * kTileKeys, 4 * kTileKeys, 2 * kTileKeys})
    if (((Tk + bk - 1) / bk) * bk * 8 <= Tk * 9) return bk;
  return 2 * kTileKeys;
}

template <typename T>
void run_forward(const Problem& pr, const T* q, const T* k, const T* v, T* out, T* lse, const RopeTable<T>& tab) {
  if (lanes_forward(pr))
    return pr.d <= 8 ? forward_lanes_kernel<T, T, 8>(pr, q, k, v, out, lse, tab)
                     : forward_lanes_kernel<T, T, 16>(pr, q, k, v, out, lse, tab);
  dispatch_head_size(padded_head<T>(pr.d), [&](auto DPc) {
    constexpr int DP = decltype(DPc)::value;
    // Head size 64 over many unmasked keys (a codebook) takes wider tiles: the per-row softmax
    // bookkeeping (max, rescale of the output rows) is spread over more scores; a whole
    // 512-code codebook is one tile and needs no online rescale at all (8.5 -> 8.2 ms at B 64,
    // T 96, 1 thread). The widest tile that pads the keys by at most 1/8 is taken (short key
    // ranges would only pad more, a causal diagonal would mask more).
    const int64_t wide = DP == 64 && !pr.causal ? wide_key_tile(pr.Tk) : 0;
    if (wide == 8 * kTileKeys)
      forward_kernel<T, T, DP, 8 * kTileKeys>(pr, q, k, v, out, lse, tab);
    else if (wide == 4 * kTileKeys)
      forward_kernel<T, T, DP, 4 * kTileKeys>(pr, q, k, v, out, lse, tab);
    else if (wide == 2 * kTileKeys)
      forward_kernel<T, T, DP, 2 * kTileKeys>(pr, q, k, v, out, lse, tab);
    else
      forward_kernel<T, T, DP, kTileKeys>(pr, q, k, v, out, lse, tab);
  });
}

template <typename T>
void run_backward(const Problem& pr, const T* gout, const T* q, const T* k, const T* v, const T* lse, const T* Drow,
                  T* dq, T* dk_out, T* dv_out, int64_t partial_stride, int64_t nthreads, const RopeTable<T>& tab,
                  int64_t grain) {
  if (pr.d <= kLanesBackwardMaxHead)
    return backward_lanes_kernel<T, T, 8>(pr, gout, q, k, v, lse, Drow, dq, dk_out, dv_out, partial_stride, nthreads,
                                          tab, grain);
  dispatch_head_size(padded_head<T>(pr.d), [&](auto DPc) {
    backward_kernel<T, T, decltype(DPc)::value>(pr, gout, q, k, v, lse, Drow, dq, dk_out, dv_out, partial_stride,
                                                nthreads, tab, grain);
  });
}

// This instruction set's entry in the kernel table (rope_attention_cpu.h).
inline AttentionKernels kernel_table() {
  return {{&run_forward<float>, &run_backward<float>, Vec<float>::W},
          {&run_forward<double>, &run_backward<double>, Vec<double>::W},
          kLanesBackwardMaxHead};
}
