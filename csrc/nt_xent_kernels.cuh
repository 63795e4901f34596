// Kernels of the fused NT-Xent op for CUDA, and their host-side launch code (see
// nt_xent_cuda.cu for the algorithm). Kept in a header so that the exact same code is compiled
// twice: by nvcc into the extension (nt_xent_cuda.cu), and by the host compiler into a CPU
// emulator (csrc/emu/nt_xent_emu.cpp: threads + barriers for a block, an emulated WMMA), which
// lets the tests check the GPU code paths - tiling, shared-memory layout, barriers, the tensor-core
// operand layouts - on a machine without a GPU.
//
// Before including this file, the includer defines NTX_LAUNCH(kernel_ptr, grid, args...) and, in
// the emulator, the CUDA built-ins the kernels use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "nt_xent.h"
#include "nt_xent_tile.h"

namespace ssl_ops {
namespace cuda_impl {

using at::Tensor;

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
// Tile kernels: at least 3 resident blocks (12 warps) per SM to hide some of the global-load
// latency of the unpipelined tile loads (caps registers at 170 per thread; 4 blocks, i.e. 128
// registers, makes ptxas spill ~240 bytes in the backward kernels).
constexpr int kMinBlocks = 3;

// Tile configuration per input dtype. BR: own vectors per block (16 per warp for WMMA), BC:
// streamed vectors per tile, KC: d-chunk of the dot-product tile, DN: d-chunk of the
// G @ stream product. Sized so that the static shared memory stays under 48 KiB.
template <typename scalar_t>
struct Cfg;
template <>
struct Cfg<c10::BFloat16> {
  static constexpr int BR = 64, BC = 64, KC = 32, DN = 64;
  static constexpr bool kWmma = true;
  using acc_t = float;
  using wmma_t = __nv_bfloat16;
};
template <>
struct Cfg<c10::Half> {
  static constexpr int BR = 64, BC = 64, KC = 32, DN = 64;
  static constexpr bool kWmma = true;
  using acc_t = float;
  using wmma_t = __half;
};
template <>
struct Cfg<float> {
  static constexpr int BR = 64, BC = 64, KC = 16, DN = 32;
  static constexpr bool kWmma = false;
  using acc_t = float;
  using wmma_t = float;
};
template <>
struct Cfg<double> {
  static constexpr int BR = 32, BC = 32, KC = 16, DN = 32;
  static constexpr bool kWmma = false;
  using acc_t = double;
  using wmma_t = double;
};

// Shared-memory layout (byte offsets, each region 128-byte aligned; WMMA needs 32-byte aligned
// tile pointers and leading dimensions that are multiples of 16 bytes):
//   [U]   union of { A [BR][LDA], B [BC][LDA] } (dot-product staging) and B2 [BC][LDB2]
//   [S]   acc_t [BR][LDS]   raw dot products of the tile
//   [G]   g_t   [BR][LDG]   (softmax - onehot) * w, input dtype for the tensor cores
//   [ROW] acc_t [3][BR]     forward: running max, running sum, positive logit
template <typename scalar_t>
struct Smem {
  using C = Cfg<scalar_t>;
  using acc_t = typename C::acc_t;
  using g_t = std::conditional_t<C::kWmma, scalar_t, acc_t>;
  static constexpr int PAD = C::kWmma ? 8 : 1;
  static constexpr int LDA = C::KC + PAD;
  static constexpr int LDB2 = C::DN + PAD;
  static constexpr int LDS = C::BC + (C::kWmma ? 4 : 1);
  static constexpr int LDG = C::BC + PAD;
  static constexpr size_t up(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t kDot = up(sizeof(scalar_t) * (C::BR + C::BC) * LDA);
  static constexpr size_t kB2 = up(sizeof(scalar_t) * C::BC * LDB2);
  static constexpr size_t oS = kDot > kB2 ? kDot : kB2;
  static constexpr size_t oG = oS + up(sizeof(acc_t) * C::BR * LDS);
  static constexpr size_t oRow = oG + up(sizeof(g_t) * C::BR * LDG);
  static constexpr size_t kBytes = oRow + up(3 * sizeof(acc_t) * C::BR);
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
  static_assert(!C::kWmma || C::BR == 16 * kWarps, "WMMA: one 16-row strip per warp");
  static_assert(C::BR % 8 == 0 && C::BC % 32 == 0 && C::DN % 16 == 0, "thread mapping");
};

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dst[a][k] = src[row0 + a][k0 + k] for a < rows, k < kc; zero outside [0, n) x [0, d).
// vec: 16-byte loads (d a multiple of the vector width and 16-byte aligned base pointer).
template <typename scalar_t>
__device__ __forceinline__ void load_chunk(scalar_t* dst, int ld, const scalar_t* __restrict__ src,
                                           int64_t row0, int64_t n, int rows, int64_t k0,
                                           int64_t d, int kc, bool vec) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (vec && kc % V == 0) {
    const int kv = kc / V;
    for (int e = threadIdx.x; e < rows * kv; e += kThreads) {
      const int a = e / kv, k = (e % kv) * V;
      const int64_t row = row0 + a, col = k0 + k;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < n && col < d) v = *reinterpret_cast<const uint4*>(src + row * d + col);
      scalar_t* out = dst + a * ld + k;
      if ((ld * sizeof(scalar_t)) % 16 == 0) {
        *reinterpret_cast<uint4*>(out) = v;  // padded WMMA staging rows are 16-byte aligned
      } else {
        const scalar_t* pv = reinterpret_cast<const scalar_t*>(&v);
#pragma unroll
        for (int t = 0; t < V; ++t) out[t] = pv[t];
      }
    }
  } else {
    for (int e = threadIdx.x; e < rows * kc; e += kThreads) {
      const int a = e / kc, k = e % kc;
      const int64_t row = row0 + a, col = k0 + k;
      dst[a * ld + k] = (row < n && col < d) ? src[row * d + col] : scalar_t(0);
    }
  }
}

// S[a][b] = own[own0 + a] . str[str0 + b] for a < BR, b < BC (0 beyond n_own / n_str), in acc_t.
// Starts and ends with a block barrier: callers may reuse any shared region afterwards.
template <typename scalar_t>
__device__ void tile_dot(const scalar_t* __restrict__ own, int64_t own0, int64_t n_own,
                         const scalar_t* __restrict__ str, int64_t str0, int64_t n_str,
                         int64_t d, bool vec, unsigned char* smem) {
  using C = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename C::acc_t;
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = As + C::BR * SM::LDA;
  acc_t* S = reinterpret_cast<acc_t*>(smem + SM::oS);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (C::kWmma) {
    namespace wmma = nvcuda::wmma;
    using T = typename C::wmma_t;
    const int warp = threadIdx.x / 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[C::BC / 16];
#pragma unroll
    for (int n = 0; n < C::BC / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
    for (int64_t k0 = 0; k0 < d; k0 += C::KC) {
      __syncthreads();  // previous readers of the staging buffers are done
      load_chunk(As, SM::LDA, own, own0, n_own, C::BR, k0, d, C::KC, vec);
      load_chunk(Bs, SM::LDA, str, str0, n_str, C::BC, k0, d, C::KC, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < C::KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(As + warp * 16 * SM::LDA + kk),
                               SM::LDA);
#pragma unroll
        for (int n = 0; n < C::BC / 16; ++n) {
          // B[k][b] = str[b][k]: the staged [BC][KC] tile read as a col-major [KC][BC] matrix.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(Bs + n * 16 * SM::LDA + kk),
                                 SM::LDA);
          wmma::mma_sync(acc[n], fa, fb, acc[n]);
        }
      }
    }
    if (d == 0) __syncthreads();  // no k-chunk ran: wait for the readers of the previous S
#pragma unroll
    for (int n = 0; n < C::BC / 16; ++n)
      wmma::store_matrix_sync(S + warp * 16 * SM::LDS + n * 16, acc[n], SM::LDS,
                              wmma::mem_row_major);
    __syncthreads();
    return;
  }
#endif
  // SIMT: thread (ty, tx) owns rows ty + 8p and columns tx + 16q of the tile.
  constexpr int RP = C::BR / 8, CQ = C::BC / 16;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[RP][CQ];
#pragma unroll
  for (int p = 0; p < RP; ++p)
#pragma unroll
    for (int q = 0; q < CQ; ++q) acc[p][q] = acc_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += C::KC) {
    __syncthreads();
    load_chunk(As, SM::LDA, own, own0, n_own, C::BR, k0, d, C::KC, vec);
    load_chunk(Bs, SM::LDA, str, str0, n_str, C::BC, k0, d, C::KC, vec);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < C::KC; ++k) {
      acc_t av[RP], bv[CQ];
#pragma unroll
      for (int p = 0; p < RP; ++p) av[p] = static_cast<acc_t>(As[(ty + 8 * p) * SM::LDA + k]);
#pragma unroll
      for (int q = 0; q < CQ; ++q) bv[q] = static_cast<acc_t>(Bs[(tx + 16 * q) * SM::LDA + k]);
#pragma unroll
      for (int p = 0; p < RP; ++p)
#pragma unroll
        for (int q = 0; q < CQ; ++q) acc[p][q] += av[p] * bv[q];
    }
  }
  if (d == 0) __syncthreads();  // no k-chunk ran: wait for the readers of the previous S
#pragma unroll
  for (int p = 0; p < RP; ++p)
#pragma unroll
    for (int q = 0; q < CQ; ++q) S[(ty + 8 * p) * SM::LDS + tx + 16 * q] = acc[p][q];
  __syncthreads();
}

// acc_buf[own0 + a][n0 + n] += sum_b G[a][b] * str[str0 + b][n0 + n], for every d-chunk n0.
// acc_buf is [n_own padded to BR, dpad] in acc_t and is touched by this block only.
template <typename scalar_t>
__device__ void tile_grad_product(const scalar_t* __restrict__ str, int64_t str0, int64_t n_str,
                                  int64_t d, int64_t dpad, bool vec, int64_t own0,
                                  typename Cfg<scalar_t>::acc_t* __restrict__ acc_buf,
                                  unsigned char* smem) {
  using C = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename C::acc_t;
  using g_t = typename SM::g_t;
  scalar_t* B2 = reinterpret_cast<scalar_t*>(smem);  // aliases the dot-product staging
  const g_t* G = reinterpret_cast<const g_t*>(smem + SM::oG);
  for (int64_t n0 = 0; n0 < d; n0 += C::DN) {
    __syncthreads();  // G is complete; the previous chunk of B2 has been consumed
    load_chunk(B2, SM::LDB2, str, str0, n_str, C::BC, n0, d, C::DN, vec);
    __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (C::kWmma) {
      namespace wmma = nvcuda::wmma;
      using T = typename C::wmma_t;
      const int warp = threadIdx.x / 32;
      float* out = acc_buf + (own0 + warp * 16) * dpad + n0;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[C::DN / 16];
#pragma unroll
      for (int n = 0; n < C::DN / 16; ++n)
        wmma::load_matrix_sync(acc[n], out + n * 16, dpad, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < C::BC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(G + warp * 16 * SM::LDG + kk),
                               SM::LDG);
#pragma unroll
        for (int n = 0; n < C::DN / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(B2 + kk * SM::LDB2 + n * 16),
                                 SM::LDB2);
          wmma::mma_sync(acc[n], fa, fb, acc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < C::DN / 16; ++n)
        wmma::store_matrix_sync(out + n * 16, acc[n], dpad, wmma::mem_row_major);
      continue;
    }
#endif
    constexpr int RP = C::BR / 8, CQ = C::DN / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    acc_t acc[RP][CQ];
#pragma unroll
    for (int p = 0; p < RP; ++p)
#pragma unroll
      for (int q = 0; q < CQ; ++q)
        acc[p][q] = acc_buf[(own0 + ty + 8 * p) * dpad + n0 + tx + 16 * q];
#pragma unroll 4
    for (int b = 0; b < C::BC; ++b) {
      acc_t gv[RP], bv[CQ];
#pragma unroll
      for (int p = 0; p < RP; ++p) gv[p] = static_cast<acc_t>(G[(ty + 8 * p) * SM::LDG + b]);
#pragma unroll
      for (int q = 0; q < CQ; ++q) bv[q] = static_cast<acc_t>(B2[b * SM::LDB2 + tx + 16 * q]);
#pragma unroll
      for (int p = 0; p < RP; ++p)
#pragma unroll
        for (int q = 0; q < CQ; ++q) acc[p][q] += gv[p] * bv[q];
    }
#pragma unroll
    for (int p = 0; p < RP; ++p)
#pragma unroll
      for (int q = 0; q < CQ; ++q)
        acc_buf[(own0 + ty + 8 * p) * dpad + n0 + tx + 16 * q] = acc[p][q];
  }
  __syncthreads();
}

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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fwd_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols,
               const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_r,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_c, int64_t R, int64_t C,
               int64_t d, typename Cfg<scalar_t>::acc_t inv_t, bool vec,
               typename Cfg<scalar_t>::acc_t* __restrict__ loss,
               typename Cfg<scalar_t>::acc_t* __restrict__ lse) {
  using Cf = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename Cf::acc_t;
  constexpr int RPW = Cf::BR / kWarps;  // rows per warp
  constexpr int CPL = Cf::BC / 32;      // columns per lane
  __shared__ __align__(128) unsigned char smem[SM::kBytes];
  const acc_t* S = reinterpret_cast<const acc_t*>(smem + SM::oS);
  acc_t* pl_s = reinterpret_cast<acc_t*>(smem + SM::oRow);  // positive logit per row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * Cf::BR;
  for (int a = threadIdx.x; a < Cf::BR; a += kThreads) pl_s[a] = ntx::neg_inf<acc_t>();
  // (the barrier at the start of tile_dot publishes pl_s)
  // Each lane keeps its own running (max, sum) for every row of its warp, over the columns it
  // sees (lane + 32 q of every tile); the lanes' partial states are merged once at the end, so
  // the tile loop has no shuffles at all.
  acc_t m_p[RPW], l_p[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m_p[r] = ntx::neg_inf<acc_t>();
    l_p[r] = acc_t(0);
  }
  for (int64_t j0 = 0; j0 < C; j0 += Cf::BC) {
    tile_dot<scalar_t>(rows, i0, R, cols, j0, C, d, vec, smem);
    acc_t icol[CPL];  // inv_c[j] / T of this lane's columns (0 for padding)
    int64_t jcol[CPL];
#pragma unroll
    for (int q = 0; q < CPL; ++q) {
      jcol[q] = j0 + lane + 32 * q;
      icol[q] = jcol[q] < C ? inv_c[jcol[q]] * inv_t : acc_t(0);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int a = warp * RPW + r;
      const int64_t i = i0 + a;
      if (i >= R) continue;  // warp-uniform
      const int64_t si = self[i], pi = pos[i];
      const acc_t ir = inv_r[i];
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
        l_p[r] *= ntx::fast_exp(m_p[r] - tm);
        m_p[r] = tm;
      }
#pragma unroll
      for (int q = 0; q < CPL; ++q)
        l_p[r] += x[q] == ntx::neg_inf<acc_t>() ? acc_t(0) : ntx::fast_exp(x[q] - m_p[r]);
    }
  }
  __syncwarp();  // pl_s of the warp's rows is complete
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
      st = ntx::lse_merge(st, other);
    }
    if (lane == 0) {
      CUDA_KERNEL_ASSERT(pos[i] >= 0 && pos[i] < C && self[i] >= 0 && self[i] < C);
      const acc_t v = ntx::lse_finish(st);
      lse[i] = v;
      loss[i] = v - pl_s[a];
    }
  }
}

// kColSide = false (pass 1): own = rows (index i), stream = cols (index j), w = inv_c / max.
// kColSide = true  (pass 2): own = cols (index j), stream = rows (index i), w = g inv_r / max.
template <typename scalar_t, bool kColSide>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bwd_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols,
               const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
               const typename Cfg<scalar_t>::acc_t* __restrict__ lse,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_r,
               const typename Cfg<scalar_t>::acc_t* __restrict__ inv_c,
               const typename Cfg<scalar_t>::acc_t* __restrict__ w_stream, int64_t R, int64_t C,
               int64_t d, int64_t dpad, typename Cfg<scalar_t>::acc_t inv_t, bool vec,
               typename Cfg<scalar_t>::acc_t* __restrict__ acc_buf) {
  using Cf = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename Cf::acc_t;
  using g_t = typename SM::g_t;
  constexpr int RPW = Cf::BR / kWarps;
  constexpr int CPL = Cf::BC / 32;
  __shared__ __align__(128) unsigned char smem[SM::kBytes];
  const acc_t* S = reinterpret_cast<const acc_t*>(smem + SM::oS);
  g_t* G = reinterpret_cast<g_t*>(smem + SM::oG);
  const scalar_t* own = kColSide ? cols : rows;
  const scalar_t* str = kColSide ? rows : cols;
  const int64_t n_own = kColSide ? C : R, n_str = kColSide ? R : C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * Cf::BR;
  for (int64_t str0 = 0; str0 < n_str; str0 += Cf::BC) {
    tile_dot<scalar_t>(own, own0, n_own, str, str0, n_str, d, vec, smem);
    // Streamed-side data of this lane's columns, loaded once per tile: inverse norm and weight,
    // and in pass 2 (streamed = rows) the row statistics lse, self, pos.
    bool s_ok[CPL];
    acc_t s_inv[CPL], s_w[CPL], s_lse[CPL];
    int64_t s_idx[CPL], s_self[CPL], s_pos[CPL];
#pragma unroll
    for (int q = 0; q < CPL; ++q) {
      s_idx[q] = str0 + lane + 32 * q;
      s_ok[q] = s_idx[q] < n_str;
      const int64_t sc = s_ok[q] ? s_idx[q] : 0;
      s_inv[q] = (kColSide ? inv_r[sc] : inv_c[sc]) * inv_t;
      s_w[q] = s_ok[q] ? w_stream[sc] : acc_t(0);
      s_lse[q] = kColSide ? lse[sc] : acc_t(0);
      s_self[q] = kColSide ? self[sc] : -1;
      s_pos[q] = kColSide ? pos[sc] : -1;
    }
    for (int r = 0; r < RPW; ++r) {
      const int a = warp * RPW + r;
      const int64_t o = own0 + a;
      const bool o_ok = o < n_own;  // warp-uniform
      const int64_t oc = o_ok ? o : 0;
      const acc_t o_inv = kColSide ? inv_c[oc] : inv_r[oc];
      const acc_t o_lse = kColSide ? acc_t(0) : lse[oc];
      const int64_t o_self = kColSide ? -1 : self[oc], o_pos = kColSide ? -1 : pos[oc];
#pragma unroll
      for (int q = 0; q < CPL; ++q) {
        acc_t gv = 0;
        if (o_ok && s_ok[q]) {
          // (i, j) = (own, streamed) in pass 1, (streamed, own) in pass 2
          const bool is_self = kColSide ? (o == s_self[q]) : (s_idx[q] == o_self);
          const bool is_pos = kColSide ? (o == s_pos[q]) : (s_idx[q] == o_pos);
          const acc_t lg = S[a * SM::LDS + lane + 32 * q] * (o_inv * s_inv[q]);
          gv = ntx::softmax_minus_onehot(lg, kColSide ? s_lse[q] : o_lse, is_self, is_pos) *
               s_w[q];
        }
        G[a * SM::LDG + lane + 32 * q] = static_cast<g_t>(gv);
      }
    }
    tile_grad_product<scalar_t>(str, str0, n_str, d, dpad, vec, own0, acc_buf, smem);
  }
}

// out[x] = normalize_backward(scale * acc[x], x * inv): one warp per vector.
// scale = inv_t * scale0[0] * (scale_vec ? scale_vec[x] : 1).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc_t* __restrict__ acc_buf, int64_t dpad, const scalar_t* __restrict__ x,
                    const acc_t* __restrict__ inv, const acc_t* __restrict__ scale_vec,
                    const acc_t* __restrict__ scale0, acc_t inv_t, int64_t n, int64_t d,
                    scalar_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const acc_t scale = inv_t * scale0[0] * (scale_vec != nullptr ? scale_vec[i] : acc_t(1));
  const acc_t iv = inv[i];
  acc_t dot = 0, ss = 0;
  for (int64_t k = lane; k < d; k += 32) {
    const acc_t xv = static_cast<acc_t>(x[i * d + k]);
    dot += acc_buf[i * dpad + k] * scale * (xv * iv);
    ss += xv * xv;
  }
  dot = warp_sum(dot);
  ss = warp_sum(ss);
  const bool clamped = ntx::norm_clamped(ss);
  for (int64_t k = lane; k < d; k += 32) {
    const acc_t xv = static_cast<acc_t>(x[i * d + k]);
    out[i * d + k] = static_cast<scalar_t>(
        ntx::normalize_backward(acc_buf[i * dpad + k] * scale, xv * iv, dot, iv, clamped));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename scalar_t>
inline bool vec_ok(const Tensor& a, const Tensor& b) {
  constexpr int V = 16 / sizeof(scalar_t);
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr());
  const auto pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  return a.size(1) % V == 0 && pa % 16 == 0 && pb % 16 == 0;
}


std::tuple<Tensor, Tensor, Tensor, Tensor> nt_xent_fwd_impl(const Tensor& rows, const Tensor& cols,
                                                            const Tensor& pos_idx,
                                                            const Tensor& self_idx,
                                                            double temperature) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  const Tensor r = rows.contiguous(), c = cols.contiguous();
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  const auto opts = r.options().dtype(acc_type_of(r.scalar_type()));
  Tensor loss = at::empty({R}, opts), lse = at::empty({R}, opts);
  Tensor inv_r = at::empty({R}, opts), inv_c = at::empty({C}, opts);
  if (R == 0) return {loss, lse, inv_r, inv_c};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "nt_xent_fwd_cuda",
                                  [&] {
    using Cf = Cfg<scalar_t>;
    using acc_t = typename Cf::acc_t;
    const bool vec = vec_ok<scalar_t>(r, c);
    NTX_LAUNCH((&inv_norm_kernel<scalar_t, acc_t>), ceil_div(R, kWarps),
        r.data_ptr<scalar_t>(), R, d, inv_r.data_ptr<acc_t>());
    if (C > 0) {
      NTX_LAUNCH((&inv_norm_kernel<scalar_t, acc_t>), ceil_div(C, kWarps),
          c.data_ptr<scalar_t>(), C, d, inv_c.data_ptr<acc_t>());
    }
    NTX_LAUNCH((&fwd_kernel<scalar_t>), ceil_div(R, Cf::BR),
        r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
        self.data_ptr<int64_t>(), inv_r.data_ptr<acc_t>(), inv_c.data_ptr<acc_t>(), R, C, d,
        static_cast<acc_t>(1.0 / temperature), vec, loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>());
  });
  return {loss, lse, inv_r, inv_c};
}

std::tuple<Tensor, Tensor> nt_xent_bwd_impl(const Tensor& grad_loss, const Tensor& rows,
                                            const Tensor& cols, const Tensor& pos_idx,
                                            const Tensor& self_idx, const Tensor& lse,
                                            const Tensor& inv_r, const Tensor& inv_c,
                                            double temperature) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  check_bwd_inputs(grad_loss, rows, cols, lse, inv_r, inv_c);
  const Tensor r = rows.contiguous(), c = cols.contiguous();
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  const auto acc_type = acc_type_of(r.scalar_type());
  const Tensor g = grad_loss.to(acc_type).contiguous();  // mean(): a stride-0 expand
  const Tensor l = lse.contiguous(), ir = inv_r.contiguous(), ic = inv_c.contiguous();
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  Tensor grad_r = at::empty({R, d}, r.options()), grad_c = at::empty({C, d}, c.options());
  if (R == 0 || C == 0 || d == 0) return {grad_r.zero_(), grad_c.zero_()};
  // Streamed-side weights, normalised by their maximum so that the G tiles (rounded to fp16 /
  // bf16 for the tensor cores) neither overflow nor flush to zero whatever the norms and the
  // incoming gradient's scale; the maxima are re-applied in fp32 in finalize_kernel.
  const double tiny = acc_type == at::kDouble ? 1e-300 : 1e-30;
  const Tensor smax_c = ic.amax().clamp_min(tiny);  // 0-dim, stays on the device
  const Tensor w_c = ic / smax_c;                    // [C]
  const Tensor gw = g * ir;                          // [R] g_i * inv_r[i]
  const Tensor smax_r = gw.abs().amax().clamp_min(tiny);
  const Tensor w_r = gw / smax_r;  // [R]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "nt_xent_bwd_cuda",
                                  [&] {
    using Cf = Cfg<scalar_t>;
    using acc_t = typename Cf::acc_t;
    const bool vec = vec_ok<scalar_t>(r, c);
    const int64_t dpad = ceil_div(d, Cf::DN) * Cf::DN;
    const auto aopts = r.options().dtype(acc_type);
    // Per-block-owned fp32 accumulators, padded to whole tiles: O((R + C) d), never R x C.
    Tensor acc_r = at::zeros({ceil_div(R, Cf::BR) * Cf::BR, dpad}, aopts);
    Tensor acc_c = at::zeros({ceil_div(C, Cf::BR) * Cf::BR, dpad}, aopts);
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    NTX_LAUNCH((&bwd_kernel<scalar_t, false>), ceil_div(R, Cf::BR),
        r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
        self.data_ptr<int64_t>(), l.data_ptr<acc_t>(), ir.data_ptr<acc_t>(), ic.data_ptr<acc_t>(),
        w_c.data_ptr<acc_t>(), R, C, d, dpad, inv_t, vec, acc_r.data_ptr<acc_t>());
    NTX_LAUNCH((&bwd_kernel<scalar_t, true>), ceil_div(C, Cf::BR),
        r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
        self.data_ptr<int64_t>(), l.data_ptr<acc_t>(), ir.data_ptr<acc_t>(), ic.data_ptr<acc_t>(),
        w_r.data_ptr<acc_t>(), R, C, d, dpad, inv_t, vec, acc_c.data_ptr<acc_t>());
    NTX_LAUNCH((&finalize_kernel<scalar_t, acc_t>), ceil_div(R, kWarps),
        acc_r.data_ptr<acc_t>(), dpad, r.data_ptr<scalar_t>(), ir.data_ptr<acc_t>(),
        g.data_ptr<acc_t>(), smax_c.data_ptr<acc_t>(), inv_t, R, d, grad_r.data_ptr<scalar_t>());
    NTX_LAUNCH((&finalize_kernel<scalar_t, acc_t>), ceil_div(C, kWarps),
        acc_c.data_ptr<acc_t>(), dpad, c.data_ptr<scalar_t>(), ic.data_ptr<acc_t>(), nullptr,
        smax_r.data_ptr<acc_t>(), inv_t, C, d, grad_c.data_ptr<scalar_t>());
  });
  return {grad_r, grad_c};
}

}  // namespace cuda_impl
}  // namespace ssl_ops
