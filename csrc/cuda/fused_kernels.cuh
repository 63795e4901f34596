// The fused CUDA kernels: inverse norms, the forward tile kernel (online log-sum-exp over the
// column tiles of one split) and the merge of its splits, the backward tile kernel (both passes:
// recompute S, form G = softmax - onehot, accumulate G @ stream tile) and its finalize (sum of the
// splits, the normalisation's Jacobian). Launched by launch.cuh; the algorithm is described in
// nt_xent_cuda.cu, the tile configuration in fused_config.cuh.
#pragma once

#include <cstdint>

#include "fused_tiles.cuh"
#include "nt_xent_tile.h"

namespace ssl_ops {
namespace cuda_impl {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    inv_norm_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t d, acc_t* __restrict__ inv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  acc_t ss = 0;
  for (int64_t k = lane; k < d; k += 32) {
    const acc_t v = static_cast<acc_t>(x[i * d + k]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) inv[i] = ntx::inv_norm(ss);
}

// Forward, block (x, y): rows BR x .. BR x + BR - 1 against the column tiles of split y,
// [y * tps * BC, min(C, (y + 1) * tps * BC)). Writes the split's partial state of each row:
// running max m, sum l = sum exp(logit - m), and the positive logit if pos_i lies in this split
// (-inf otherwise), at [y * R + i]; merge_kernel combines the splits.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fwd_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols,
               const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_r,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_c, int64_t R, int64_t C,
               int64_t d, typename Cfg<scalar_t>::acc_t inv_t, bool vec, int64_t tps,
               typename Cfg<scalar_t>::acc_t* __restrict__ part_m,
               typename Cfg<scalar_t>::acc_t* __restrict__ part_l,
               typename Cfg<scalar_t>::acc_t* __restrict__ part_pl) {
  using Cf = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename Cf::acc_t;
  constexpr int RPW = Cf::BR / kWarps;  // rows per warp
  constexpr int CPL = Cf::BC / 32;      // columns per lane
  NTX_SMEM(smem, SM::kBytes);
  const acc_t* S = reinterpret_cast<const acc_t*>(smem + SM::oS);
  acc_t* pl_s = reinterpret_cast<acc_t*>(smem + SM::oRow);  // positive logit per row
  acc_t* ir_s = pl_s + Cf::BR;                              // inv_r[i] per row
  int64_t* self_s = reinterpret_cast<int64_t*>(smem + SM::oRowIdx);
  int64_t* pos_s = self_s + Cf::BR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * Cf::BR;
  const acc_t inv_t2 = inv_t * acc_t(ntx::kLog2e);  // logits in log2 units: exp2 below
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * tps * Cf::BC;
  const int64_t j_end = j_begin + tps * Cf::BC < C ? j_begin + tps * Cf::BC : C;
  // Per-row constants, once per block (the barrier at the start of tile_dot publishes them).
  for (int a = threadIdx.x; a < Cf::BR; a += kThreads) {
    const int64_t i = i0 + a;
    const bool ok = i < R;
    pl_s[a] = ntx::neg_inf<acc_t>();
    ir_s[a] = ok ? inv_r[i] : acc_t(0);
    self_s[a] = ok ? self[i] : -1;
    pos_s[a] = ok ? pos[i] : -1;
  }
  // Each lane keeps its own running (max, sum) for every row of its warp, over the columns it
  // sees (lane + 32 q of every tile); the lanes' partial states are merged once at the end, so
  // the tile loop has no shuffles at all.
  acc_t m_p[RPW], l_p[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m_p[r] = ntx::neg_inf<acc_t>();
    l_p[r] = acc_t(0);
  }
  for (int64_t j0 = j_begin; j0 < j_end; j0 += Cf::BC) {
    tile_dot<scalar_t>(rows, i0, R, cols, j0, C, d, vec, smem);
    acc_t icol[CPL];  // inv_c[j] / T * log2(e) of this lane's columns (0 for padding)
    int64_t jcol[CPL];
#pragma unroll
    for (int q = 0; q < CPL; ++q) {
      jcol[q] = j0 + lane + 32 * q;
      icol[q] = jcol[q] < C ? inv_c[jcol[q]] * inv_t2 : acc_t(0);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int a = warp * RPW + r;
      if (i0 + a >= R) continue;  // warp-uniform
      const int64_t si = self_s[a], pi = pos_s[a];
      const acc_t ir = ir_s[a];
      acc_t x[CPL];
      acc_t tm = ntx::neg_inf<acc_t>();
#pragma unroll
      for (int q = 0; q < CPL; ++q) {
        const int64_t j = jcol[q];
        // self column and padding: -inf, exactly zero weight
        x[q] = (j < C && j != si) ? S[a * SM::LDS + lane + 32 * q] * (ir * icol[q])
                                  : ntx::neg_inf<acc_t>();
        if (j == pi) pl_s[a] = x[q];  // one lane; pos == self gives -inf, an inf loss
        tm = x[q] > tm ? x[q] : tm;
      }
      if (tm > m_p[r]) {  // new running max: rescale this lane's sum (exp(-inf) = 0 at start)
        l_p[r] *= ntx::fast_exp2(m_p[r] - tm);
        m_p[r] = tm;
      }
#pragma unroll
      for (int q = 0; q < CPL; ++q)
        l_p[r] += x[q] == ntx::neg_inf<acc_t>() ? acc_t(0) : ntx::fast_exp2(x[q] - m_p[r]);
    }
  }
  __syncthreads();  // pl_s of every row is complete (also when this split had no tile)
  const int64_t base = static_cast<int64_t>(blockIdx.y) * R;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int a = warp * RPW + r;
    const int64_t i = i0 + a;
    if (i >= R) continue;  // warp-uniform
    ntx::LseState<acc_t> st{m_p[r], l_p[r]};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const ntx::LseState<acc_t> other{__shfl_xor_sync(0xffffffffu, st.m, o),
                                       __shfl_xor_sync(0xffffffffu, st.l, o)};
      st = ntx::lse_merge2(st, other);
    }
    if (lane == 0) {  // back to natural-log units (l = sum 2^(x2 - m2) = sum e^(x - m))
      part_m[base + i] = st.m * acc_t(ntx::kLn2);
      part_l[base + i] = st.l;
      part_pl[base + i] = pl_s[a] * acc_t(ntx::kLn2);
    }
  }
}

// Combines the splits' partial states of each row in split order (deterministic):
// lse = log-sum-exp over all columns, loss = lse - positive logit. One thread per row.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const acc_t* __restrict__ part_m, const acc_t* __restrict__ part_l,
                 const acc_t* __restrict__ part_pl, int64_t splits, int64_t R,
                 acc_t* __restrict__ loss, acc_t* __restrict__ lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= R) return;
  ntx::LseState<acc_t> st{ntx::neg_inf<acc_t>(), acc_t(0)};
  acc_t pl = ntx::neg_inf<acc_t>();
  for (int64_t s = 0; s < splits; ++s) {
    st = ntx::lse_merge(st, ntx::LseState<acc_t>{part_m[s * R + i], part_l[s * R + i]});
    const acc_t p = part_pl[s * R + i];
    pl = p > pl ? p : pl;  // finite in the one split that holds pos_i
  }
  const acc_t v = ntx::lse_finish(st);
  lse[i] = v;
  loss[i] = v - pl;
}

// G[a][b] = (softmax - onehot(pos)) * w_stream * kGScale for the tile of own vectors own0 + a and
// streamed vectors str0 + b (0 outside the valid range), from the raw dot products in S.
// kColSide = false (pass 1): own = rows (index i), stream = cols (index j), w = inv_c / max.
// kColSide = true  (pass 2): own = cols (index j), stream = rows (index i), w = g inv_r / max.
template <typename scalar_t, bool kColSide>
__device__ __forceinline__ void make_g_tile(const int64_t* __restrict__ pos,
                                            const int64_t* __restrict__ self,
                                            const typename Cfg<scalar_t>::acc_t* __restrict__ lse,
                                            const typename Cfg<scalar_t>::acc_t* __restrict__ s_invv,
                                            const typename Cfg<scalar_t>::acc_t* __restrict__ w_stream,
                                            int64_t own0, int64_t n_own, int64_t str0,
                                            int64_t n_str, typename Cfg<scalar_t>::acc_t inv_t,
                                            unsigned char* smem) {
  using Cf = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename Cf::acc_t;
  using g_t = typename SM::g_t;
  constexpr int RPW = Cf::BR / kWarps;
  constexpr int CPL = Cf::BC / 32;
  const acc_t* S = reinterpret_cast<const acc_t*>(smem + SM::oS);
  g_t* G = reinterpret_cast<g_t*>(smem + SM::oG);
  const acc_t* o_lse_s = reinterpret_cast<const acc_t*>(smem + SM::oRow);
  const acc_t* o_inv_s = o_lse_s + Cf::BR;
  const int64_t* o_self_s = reinterpret_cast<const int64_t*>(smem + SM::oRowIdx);
  const int64_t* o_pos_s = o_self_s + Cf::BR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const acc_t inv_t2 = inv_t * acc_t(ntx::kLog2e);  // logits and lse in log2 units: exp2
  // Streamed-side data of this lane's columns, loaded once per tile: inverse norm / T and weight,
  // and in pass 2 (streamed = rows) the row statistics lse, self, pos.
  bool s_ok[CPL];
  acc_t s_inv[CPL], s_w[CPL], s_lse[CPL];
  int64_t s_idx[CPL], s_self[CPL], s_pos[CPL];
#pragma unroll
  for (int q = 0; q < CPL; ++q) {
    s_idx[q] = str0 + lane + 32 * q;
    s_ok[q] = s_idx[q] < n_str;
    const int64_t sc = s_ok[q] ? s_idx[q] : 0;
    s_inv[q] = s_invv[sc] * inv_t2;
    s_w[q] = s_ok[q] ? w_stream[sc] * acc_t(Cf::kGScale) : acc_t(0);
    s_lse[q] = kColSide ? lse[sc] * acc_t(ntx::kLog2e) : acc_t(0);
    s_self[q] = kColSide ? self[sc] : -1;
    s_pos[q] = kColSide ? pos[sc] : -1;
  }
  for (int r = 0; r < RPW; ++r) {
    const int a = warp * RPW + r;
    const int64_t o = own0 + a;
    const bool o_ok = o < n_own;  // warp-uniform
    const acc_t o_inv = o_inv_s[a];
    const acc_t o_lse = o_lse_s[a];
    const int64_t o_self = o_self_s[a], o_pos = o_pos_s[a];
#pragma unroll
    for (int q = 0; q < CPL; ++q) {
      acc_t gv = 0;
      if (o_ok && s_ok[q]) {
        // (i, j) = (own, streamed) in pass 1, (streamed, own) in pass 2
        const bool is_self = kColSide ? (o == s_self[q]) : (s_idx[q] == o_self);
        const bool is_pos = kColSide ? (o == s_pos[q]) : (s_idx[q] == o_pos);
        const acc_t lg = S[a * SM::LDS + lane + 32 * q] * (o_inv * s_inv[q]);
        gv = ntx::softmax_minus_onehot2(lg, kColSide ? s_lse[q] : o_lse, is_self, is_pos) *
             s_w[q];
      }
      G[a * SM::LDG + lane + 32 * q] = static_cast<g_t>(gv);
    }
  }
}

// Backward, block (x, y): own vectors BR x .. (rows in pass 1, cols in pass 2) against the
// streamed tiles of split y; recomputes S, forms G and accumulates G @ stream_tile into the
// [BR, d] accumulator (registers for ND > 0, else the global buffer), which ends in
// part[y][own][0 .. dpad): every element has one writer, no atomics; finalize_kernel sums the
// splits in a fixed order.
template <typename scalar_t, bool kColSide, int ND>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks<ND>())
    bwd_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols,
               const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
               const typename Cfg<scalar_t>::acc_t* __restrict__ lse,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_r,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_c,
               const typename Cfg<scalar_t>::acc_t* __restrict__ w_stream, int64_t R, int64_t C,
               int64_t d, int64_t dpad, typename Cfg<scalar_t>::acc_t inv_t, bool vec,
               int64_t tps, int64_t own_pad, typename Cfg<scalar_t>::acc_t* __restrict__ part) {
  using Cf = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename Cf::acc_t;
  NTX_SMEM(smem, SM::kBytes);
  const scalar_t* own = kColSide ? cols : rows;
  const scalar_t* str = kColSide ? rows : cols;
  const int64_t n_own = kColSide ? C : R, n_str = kColSide ? R : C;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * Cf::BR;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * tps * Cf::BC;
  const int64_t s_end = s_begin + tps * Cf::BC < n_str ? s_begin + tps * Cf::BC : n_str;
  acc_t* out = part + static_cast<int64_t>(blockIdx.y) * own_pad * dpad;
  {  // own-side constants, once per block (published by the barrier at the start of tile_dot)
    acc_t* o_lse_s = reinterpret_cast<acc_t*>(smem + SM::oRow);
    acc_t* o_inv_s = o_lse_s + Cf::BR;
    int64_t* o_self_s = reinterpret_cast<int64_t*>(smem + SM::oRowIdx);
    int64_t* o_pos_s = o_self_s + Cf::BR;
    for (int a = threadIdx.x; a < Cf::BR; a += kThreads) {
      const int64_t o = own0 + a;
      const bool ok = o < n_own;
      o_inv_s[a] = ok ? (kColSide ? inv_c[o] : inv_r[o]) : acc_t(0);
      o_lse_s[a] = ok && !kColSide ? lse[o] * acc_t(ntx::kLog2e) : acc_t(0);
      o_self_s[a] = ok && !kColSide ? self[o] : -1;
      o_pos_s[a] = ok && !kColSide ? pos[o] : -1;
    }
  }
  const acc_t* s_invv = kColSide ? inv_r : inv_c;
  if constexpr (ND == 0) {  // d beyond the register budget: accumulate in global memory
    for (int64_t str0 = s_begin; str0 < s_end; str0 += Cf::BC) {
      tile_dot<scalar_t>(own, own0, n_own, str, str0, n_str, d, vec, smem);
      make_g_tile<scalar_t, kColSide>(pos, self, lse, s_invv, w_stream, own0, n_own, str0, n_str,
                                      inv_t, smem);
      tile_grad_product<scalar_t>(str, str0, n_str, d, dpad, vec, own0, out, smem);
    }
    return;
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (Cf::kWmma) {
      namespace wmma = nvcuda::wmma;
      WmmaAcc<scalar_t, ND> acc;
#pragma unroll
      for (int c = 0; c < ND; ++c)
#pragma unroll
        for (int n = 0; n < Cf::DN / 16; ++n) wmma::fill_fragment(acc.f[c][n], 0.0f);
      for (int64_t str0 = s_begin; str0 < s_end; str0 += Cf::BC) {
        tile_dot<scalar_t>(own, own0, n_own, str, str0, n_str, d, vec, smem);
        // the first d-chunk of the streamed tile for G @ tile, in flight during make_g_tile
        if (vec && d > 0) issue_b2(smem, 0, str, str0, n_str, d);
        make_g_tile<scalar_t, kColSide>(pos, self, lse, s_invv, w_stream, own0, n_own, str0,
                                        n_str, inv_t, smem);
        grad_product_wmma<scalar_t, ND>(acc, str, str0, n_str, d, vec, smem);
      }
      const int warp = threadIdx.x / 32;
#pragma unroll
      for (int c = 0; c < ND; ++c) {
        if (int64_t(c) * Cf::DN >= d) break;
#pragma unroll
        for (int n = 0; n < Cf::DN / 16; ++n)
          wmma::store_matrix_sync(out + (own0 + warp * 16) * dpad + c * Cf::DN + n * 16,
                                  acc.f[c][n], static_cast<unsigned>(dpad), wmma::mem_row_major);
      }
    } else  // NOLINT: the SIMT path below is the else branch on tensor-core devices
#endif
    {
      SimtAcc<scalar_t, ND> acc;
      for (int c = 0; c < ND; ++c)
        for (int p = 0; p < SimtAcc<scalar_t, ND>::RP; ++p)
          for (int q = 0; q < SimtAcc<scalar_t, ND>::CQ; ++q) acc.v[c][p][q] = acc_t(0);
      for (int64_t str0 = s_begin; str0 < s_end; str0 += Cf::BC) {
        tile_dot<scalar_t>(own, own0, n_own, str, str0, n_str, d, vec, smem);
        make_g_tile<scalar_t, kColSide>(pos, self, lse, s_invv, w_stream, own0, n_own, str0,
                                        n_str, inv_t, smem);
        grad_product_simt<scalar_t, ND>(acc, str, str0, n_str, d, vec, smem);
      }
      store_acc_simt<scalar_t, ND>(acc, own0, d, dpad, out);
    }
  }
}

// out[x] = normalize_backward(scale * sum_s part[s][x], x * inv): one warp per vector; the splits
// are summed in split order (deterministic).
// scale = inv_t * post * scale0[0] * (scale_vec ? scale_vec[x] : 1), post = 1 / kGScale.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc_t* __restrict__ part, int64_t splits, int64_t own_pad, int64_t dpad,
                    const scalar_t* __restrict__ x, const acc_t* __restrict__ inv,
                    const acc_t* __restrict__ scale_vec, const acc_t* __restrict__ scale0,
                    acc_t inv_t, acc_t post, int64_t n, int64_t d, scalar_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const acc_t scale =
      inv_t * post * scale0[0] * (scale_vec != nullptr ? scale_vec[i] : acc_t(1));
  const acc_t iv = inv[i];
  const int64_t stride = own_pad * dpad;
  auto grad_xhat = [&](int64_t k) {
    acc_t s = 0;
    for (int64_t p = 0; p < splits; ++p) s += part[p * stride + i * dpad + k];
    return s * scale;
  };
  acc_t dot = 0, ss = 0;
  for (int64_t k = lane; k < d; k += 32) {
    const acc_t xv = static_cast<acc_t>(x[i * d + k]);
    dot += grad_xhat(k) * (xv * iv);
    ss += xv * xv;
  }
  dot = warp_sum(dot);
  ss = warp_sum(ss);
  const bool clamped = ntx::norm_clamped(ss);
  for (int64_t k = lane; k < d; k += 32) {
    const acc_t xv = static_cast<acc_t>(x[i * d + k]);
    out[i * d + k] =
        static_cast<scalar_t>(ntx::normalize_backward(grad_xhat(k), xv * iv, dot, iv, clamped));
  }
}

}  // namespace cuda_impl
}  // namespace ssl_ops
