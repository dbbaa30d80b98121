#pragma once
// Fused GEMM-shaped nearest-code search, generic over a SIMD "lane set" S (portable, AVX2 or
// AVX-512).
//
// Included by exactly one translation unit per instruction set, after that unit has chosen its
// target; everything here has internal linkage so the copies never meet in the linker.
//
// Shape of the computation (the FAISS exhaustive-search GEMM, with the distance matrix fused away):
//   * rows are processed in blocks of kRowBlock; each block keeps, per row, S::W running
//     (best value, best panel) lanes in a small stack buffer (no N x K anywhere);
//   * the packed codebook is walked in blocks of panels that fit in L1 next to the row block;
//   * the micro-kernel takes MR rows x NR panels (NR * W codes), accumulates bias + x . c with
//     FMAs over D (unrolled at compile time for the small head sizes), and folds the result into
//     the running argmin with one compare and two blends per vector: strictly-less keeps the
//     earliest panel, so ties go to the smallest index within a lane, and the final lane
//     reduction breaks ties by index.
#include "nearest_code_cpu.h"

namespace vqext {
namespace vq {
namespace {

constexpr int kRowBlock = 96;                  // multiple of every MR used
constexpr int64_t kCodeBlockBytes = 24 * 1024;  // packed codebook bytes per code block (L1 share)

template <class S, int MR, int NR, int DC>
inline void micro_tile(const float* const* xr, const float* packed, const float* bias, int64_t p_begin,
                       int64_t p_end, int64_t D_runtime, float* best_val, int32_t* best_panel) {
  constexpr int W = S::W;
  const int64_t D = DC > 0 ? DC : D_runtime;
  typename S::V best[MR];
  typename S::I panel_of_best[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    best[r] = S::load(best_val + r * W);
    panel_of_best[r] = S::loadi(best_panel + r * W);
  }
  for (int64_t p = p_begin; p < p_end; p += NR) {
    const float* c = packed + p * D * W;
    typename S::V acc[MR][NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[r][j] = S::load(bias + (p + j) * W);
    const auto accumulate_dim = [&](int64_t d) __attribute__((always_inline)) {
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const typename S::V cv = S::load(c + (j * D + d) * W);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) acc[r][j] = S::fma(S::bcast(xr[r][d]), cv, acc[r][j]);
      }
    };
    // A compile-time D unrolls further than a run-time one (whose remainder loop would grow).
    if (DC > 0) {
#pragma GCC unroll 8
      for (int64_t d = 0; d < D; ++d) accumulate_dim(d);
    } else {
#pragma GCC unroll 4
      for (int64_t d = 0; d < D; ++d) accumulate_dim(d);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const typename S::I pid = S::set1i(static_cast<int32_t>(p + j));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const auto better = S::less(acc[r][j], best[r]);
        best[r] = S::select(better, best[r], acc[r][j]);
        panel_of_best[r] = S::selecti(better, panel_of_best[r], pid);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    S::store(best_val + r * W, best[r]);
    S::storei(best_panel + r * W, panel_of_best[r]);
  }
}

template <class S, int MR, int NR, int DC>
void search_rows(const F32Search& s, int64_t row_begin, int64_t row_end) {
  constexpr int W = S::W;
  static_assert(kRowBlock % MR == 0, "row block must hold whole row tiles");
  static_assert(kPanelsPerStep % NR == 0, "panels are padded to kPanelsPerStep");
  alignas(64) float best_val[kRowBlock * W];
  alignas(64) int32_t best_panel[kRowBlock * W];
  const int64_t D = DC > 0 ? DC : s.D;
  int64_t panels_per_block = kCodeBlockBytes / (D * W * 4 + W * 4);
  panels_per_block = panels_per_block < kPanelsPerStep ? kPanelsPerStep
                                                       : panels_per_block / kPanelsPerStep * kPanelsPerStep;
  const float inf = __builtin_inff();

  for (int64_t rb = row_begin; rb < row_end; rb += kRowBlock) {
    const int64_t nrows = (row_end - rb) < kRowBlock ? (row_end - rb) : kRowBlock;
    const int64_t ntile_rows = (nrows + MR - 1) / MR * MR;
    for (int64_t i = 0; i < ntile_rows * W; ++i) {
      best_val[i] = inf;
      best_panel[i] = 0;
    }
    for (int64_t pb = 0; pb < s.panels; pb += panels_per_block) {
      const int64_t pe = (pb + panels_per_block) < s.panels ? (pb + panels_per_block) : s.panels;
      for (int64_t rt = 0; rt < nrows; rt += MR) {
        const float* xr[MR];
        for (int r = 0; r < MR; ++r) {
          // A partial last tile repeats its last real row; its extra lanes land in unused slots.
          const int64_t row = rb + ((rt + r) < nrows ? (rt + r) : (nrows - 1));
          xr[r] = s.x + row * s.x_row_stride;
        }
        micro_tile<S, MR, NR, DC>(xr, s.packed, s.bias, pb, pe, D, best_val + rt * W, best_panel + rt * W);
      }
    }
    // Reduce lanes: smallest value, then smallest index. Padding lanes (index >= K) never win;
    // a row whose values are all NaN (no comparison succeeds) gets index 0.
    for (int64_t r = 0; r < nrows; ++r) {
      s.index[(rb + r) * s.index_stride] = S::argmin_lanes(best_val + r * W, best_panel + r * W, s.K);
    }
  }
}

template <class S, int MR, int NR>
void search_rows_dispatch_d(const F32Search& s, int64_t row_begin, int64_t row_end) {
  // Compile-time D for the log's head sizes (and the common single-head widths) lets the whole
  // dot product unroll into a straight FMA chain with the x values broadcast from L1.
  switch (s.D) {
#define VQEXT_D_CASE(d) \
  case d:               \
    return search_rows<S, MR, NR, d>(s, row_begin, row_end);
    VQEXT_D_CASE(1) VQEXT_D_CASE(2) VQEXT_D_CASE(3) VQEXT_D_CASE(4) VQEXT_D_CASE(5) VQEXT_D_CASE(6)
    VQEXT_D_CASE(7) VQEXT_D_CASE(8) VQEXT_D_CASE(9) VQEXT_D_CASE(10) VQEXT_D_CASE(11) VQEXT_D_CASE(12)
    VQEXT_D_CASE(13) VQEXT_D_CASE(14) VQEXT_D_CASE(15) VQEXT_D_CASE(16)
#undef VQEXT_D_CASE
    default:
      return search_rows<S, MR, NR, 0>(s, row_begin, row_end);
  }
}

}  // namespace
}  // namespace vq
}  // namespace vqext
