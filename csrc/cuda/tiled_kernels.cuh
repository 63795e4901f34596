// Elementwise CUDA kernels of the tiled path (nt_xent_tiled.h: the GEMMs go to cuBLAS), launched
// by launch.cuh's TiledEW.
#pragma once

#include <cstdint>

#include "fused_config.cuh"  // kThreads, kWarps
#include "nt_xent_tile.h"

namespace ssl_ops {
namespace cuda_impl {

// One warp per row of the [R, nc] chunk of raw dot products S (fp32), lanes over its columns
// (coalesced); no shared memory, no barriers. Memory-bound: 4 bytes read per logit (forward),
// 4 read + 2 written (backward, bf16 G).

// Updates row i's running (max m, sum l) with the chunk's logits and picks its positive logit.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    tiled_fwd_chunk_kernel(const acc_t* __restrict__ S, int64_t R, int64_t nc, int64_t j0,
                           const acc_t* __restrict__ inv_r, const acc_t* __restrict__ inv_c,
                           acc_t inv_t, const int64_t* __restrict__ self,
                           const int64_t* __restrict__ pos, acc_t* __restrict__ m,
                           acc_t* __restrict__ l, acc_t* __restrict__ pl) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;  // warp-uniform
  const acc_t ri = inv_r[i] * inv_t;
  const int64_t si = self[i] - j0, pi = pos[i] - j0;  // compared, never used as addresses
  const acc_t* s = S + i * nc;
  ntx::LseState<acc_t> st{ntx::neg_inf<acc_t>(), acc_t(0)};
  for (int64_t b = lane; b < nc; b += 32) {
    const acc_t x = b == si ? ntx::neg_inf<acc_t>() : s[b] * (ri * inv_c[j0 + b]);
    if (b == pi) pl[i] = x;  // one lane of one chunk; pos == self gives -inf, an inf loss
    if (x > st.m) {  // new running max: rescale (exp(-inf) = 0 at the start)
      st.l = st.l * ntx::fast_exp(st.m - x) + acc_t(1);
      st.m = x;
    } else if (x != ntx::neg_inf<acc_t>()) {
      st.l += ntx::fast_exp(x - st.m);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const ntx::LseState<acc_t> other{__shfl_xor_sync(0xffffffffu, st.m, o),
                                     __shfl_xor_sync(0xffffffffu, st.l, o)};
    st = ntx::lse_merge(st, other);
  }
  if (lane == 0) {
    const ntx::LseState<acc_t> t = ntx::lse_merge(ntx::LseState<acc_t>{m[i], l[i]}, st);
    m[i] = t.m;
    l[i] = t.l;
  }
}

// G[i][b] = (softmax - onehot(pos))[i][j0 + b] * gscale in the GEMM dtype (in place of nothing:
// S stays fp32, G is the bf16/fp16 operand of the two gradient GEMMs).
template <typename acc_t, typename g_t>
__global__ void __launch_bounds__(kThreads)
    tiled_bwd_chunk_kernel(const acc_t* __restrict__ S, int64_t R, int64_t nc, int64_t j0,
                           const acc_t* __restrict__ inv_r, const acc_t* __restrict__ inv_c,
                           acc_t inv_t, const int64_t* __restrict__ self,
                           const int64_t* __restrict__ pos, const acc_t* __restrict__ lse,
                           acc_t gscale, g_t* __restrict__ G) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;
  const acc_t ri = inv_r[i] * inv_t, li = lse[i];
  const int64_t si = self[i] - j0, pi = pos[i] - j0;
  const acc_t* s = S + i * nc;
  g_t* gi = G + i * nc;
  for (int64_t b = lane; b < nc; b += 32) {
    const acc_t x = s[b] * (ri * inv_c[j0 + b]);
    gi[b] = static_cast<g_t>(ntx::softmax_minus_onehot(x, li, b == si, b == pi) * gscale);
  }
}

}  // namespace cuda_impl
}  // namespace ssl_ops
