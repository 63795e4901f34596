// Kernels of the fused NT-Xent op for CUDA, and their host-side launch code (see
// nt_xent_cuda.cu for the algorithm). Kept in a header so that the exact same code is compiled
// twice: by nvcc into the extension (nt_xent_cuda.cu), and by the host compiler into a CPU
// emulator (csrc/emu/nt_xent_emu.cpp: threads + barriers for a block, an emulated WMMA, deferred
// cp.async copies), which lets the tests check the GPU code paths - tiling, column splits and
// their merge, shared-memory layout, barriers, the cp.async waits, the tensor-core operand
// layouts - on a machine without a GPU.
//
// Before including this file, the includer defines NTX_LAUNCH(kernel_ptr, grid_x, grid_y, args...),
// NTX_SM_COUNT() (streaming multiprocessors of the current device, for the split heuristic),
// NTX_RESIDENT_BLOCKS(kernel_ptr) (blocks of kThreads threads of that kernel resident per SM) and,
// in the emulator, the CUDA built-ins the kernels use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <type_traits>

#include "nt_xent.h"
#include "nt_xent_tile.h"
#include "nt_xent_tiled.h"

namespace ssl_ops {
namespace cuda_impl {

using at::Tensor;

// Tile configuration for sm_90 (H100/H200: 228 KiB shared memory and 64K registers per SM), and
// why: 128 threads = 4 warps per block, each warp owning one 16-row WMMA strip of a 64 x 64
// tile (BR = BC = 64). A bf16/fp16 block uses 47.5 KiB of static shared memory (two cp.async
// staging stages, the fp32 S tile, the G tile; under the 48 KiB static limit, so no opt-in
// attribute is needed) and 168 registers per thread, i.e. 3 resident blocks (12 warps) per SM,
// register-bound (65536 / (128 x 168) = 3.05; shared memory alone would allow 4). Larger tiles
// (128 x 128) would need dynamic shared memory and halve the blocks per SM; smaller ones double
// the staging traffic per FLOP. The split over the streamed dimension (below) fills one wave of
// resident blocks for any R / C shape.
constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
// Tile kernels: at least 3 resident blocks (12 warps) per SM (caps registers at 168 per
// thread; 4 blocks, i.e. 128 registers, made ptxas spill ~240 bytes in the backward kernels).
constexpr int kMinBlocks = 3;
// The backward keeps its [BR, d] fp32 gradient accumulator in registers for the whole tile loop
// (not in global memory). ND = number of DN-wide d-chunks held: 2 (d <= 2 DN: 128 for bf16/fp16,
// 64 for fp32) or 4 (d <= 4 DN: 256 / 128; not for bf16, see Cfg::kMaxND); larger d falls back
// to a global-memory accumulator (ND = 0). The backward kernels are launched with 2 resident
// blocks per SM (up to 255 registers): with 3 (168 registers) ptxas spilled 12-332 bytes per
// thread in most of them (sm_80 and sm_90, bench/RESULTS.md's resource table at the time), and
// the bf16 ND = 4 accumulator spilled even at 255. The resource table's test holds every hot
// kernel to no spill and at least its promised resident blocks.
template <int ND>
constexpr int bwd_min_blocks() {
  return 2;
}
// Column split (flash-decoding): the forward and both backward passes split the streamed
// dimension over gridDim.y so that the grid fills the GPU when the own dimension is short
// (R = 2n local rows << C gathered columns on one of 8 ranks). Aim for one full wave: SMs x the
// kernel's real resident blocks per SM (NTX_RESIDENT_BLOCKS: the CUDA occupancy calculator for
// the compiled kernel, i.e. its registers and shared memory; the emulator uses kMinBlocks). The
// former constant 4 per SM, with 3 resident, gave 1.33 waves: the second one a third full.
// gridDim.y limit.
constexpr int64_t kMaxSplits = 65535;
// Backward partial accumulators are [splits, n_own, d] fp32: keep them under this many bytes.
constexpr int64_t kMaxPartialBytes = int64_t(512) << 20;

// Tile configuration per input dtype. BR: own vectors per block (16 per warp for WMMA), BC:
// streamed vectors per tile, KC: d-chunk of the dot-product tile, DN: d-chunk of the
// G @ stream product. Sized so that the static shared memory stays under 48 KiB.
template <typename scalar_t>
struct Cfg;
// kGScale: the G tiles (softmax - onehot) * w are rounded to the input dtype for the tensor cores;
// |G| <= 1, and in fp16 the probabilities of a 262,144-column softmax (~4e-6) would be fp16
// subnormals (normal min 6.1e-5) or flush to zero, so fp16 G is stored times 2^14 (|G| <= 16384 <
// 65504) and the factor is divided out in fp32 in finalize_kernel. bf16 has fp32's exponent range.
template <>
struct Cfg<c10::BFloat16> {
  static constexpr int BR = 64, BC = 64, KC = 32, DN = 64;
  static constexpr int kMaxND = 2;  // ND = 4 spills at 255 registers: d > 128 uses ND = 0
  static constexpr float kGScale = 1.0f;
  static constexpr bool kWmma = true;
  using acc_t = float;
  using wmma_t = __nv_bfloat16;
};
template <>
struct Cfg<c10::Half> {
  static constexpr int kMaxND = 4;
  static constexpr int BR = 64, BC = 64, KC = 32, DN = 64;
  static constexpr float kGScale = 16384.0f;
  static constexpr bool kWmma = true;
  using acc_t = float;
  using wmma_t = __half;
};
template <>
struct Cfg<float> {
  static constexpr int kMaxND = 4;
  static constexpr int BR = 64, BC = 64, KC = 16, DN = 32;
  static constexpr float kGScale = 1.0f;
  static constexpr bool kWmma = false;
  using acc_t = float;
  using wmma_t = float;
};
template <>
struct Cfg<double> {
  static constexpr int kMaxND = 4;
  static constexpr int BR = 32, BC = 32, KC = 16, DN = 32;
  static constexpr double kGScale = 1.0;
  static constexpr bool kWmma = false;
  using acc_t = double;
  using wmma_t = double;
};

// Shared-memory layout (byte offsets, each region 128-byte aligned; WMMA needs 32-byte aligned
// tile pointers and leading dimensions that are multiples of 16 bytes):
//   [U]   union of { kStages x (A [BR][LDA], B [BC][LDA]) } (dot-product staging) and
//         B2 [BC][LDB2]
//   [S]   acc_t [BR][LDS]   raw dot products of the tile
//   [G]   g_t   [BR][LDG]   (softmax - onehot) * w, input dtype for the tensor cores
//   [ROW] acc_t [2][BR], int64 [2][BR]: per-own-vector constants, loaded once per block:
//         forward: positive logit, inv_r, self, pos; backward: lse * log2(e), inverse norm,
//         self, pos
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
  // Tensor-core path: two staging buffers (cp.async double buffering, see tile_dot).
  static constexpr int kStages = C::kWmma ? 2 : 1;
  static constexpr size_t kStage = sizeof(scalar_t) * (C::BR + C::BC) * LDA;  // bytes, one stage
  static constexpr size_t kDot = up(kStages * kStage);
  static constexpr size_t kB2 = up(sizeof(scalar_t) * C::BC * LDB2);
  static constexpr size_t oS = kDot > kB2 ? kDot : kB2;
  static constexpr size_t oG = oS + up(sizeof(acc_t) * C::BR * LDS);
  static constexpr size_t oRow = oG + up(sizeof(g_t) * C::BR * LDG);
  static constexpr size_t oRowIdx = oRow + 2 * sizeof(acc_t) * C::BR;  // 8-byte aligned
  static constexpr size_t kBytes = oRow + up(2 * sizeof(acc_t) * C::BR + 2 * 8 * C::BR);
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
  static_assert(!C::kWmma || 2 * kB2 <= oS, "two B2 buffers (cp.async) fit in the union");
  static_assert(!C::kWmma || C::BR == 16 * kWarps, "WMMA: one 16-row strip per warp");
  static_assert(C::BR % 8 == 0 && C::BC % 32 == 0 && C::DN % 16 == 0, "thread mapping");
};

// ---- asynchronous global -> shared copies (sm_80+ cp.async), 16 bytes each ----
// The emulator (NTX_EMULATOR) provides its own versions, which really defer the copy to the
// wait: a read of a staged buffer before its cp.async group was waited for sees stale data there.
// The block's shared memory: a static __shared__ array on the GPU; the emulator hands out one
// buffer per launch (so that its race checker knows the addresses of shared memory).
#ifndef NTX_SMEM
#define NTX_SMEM(name, bytes) __shared__ __align__(128) unsigned char name[bytes]
#endif

#ifndef NTX_EMULATOR
// dst <- 16 bytes at src, or 16 zero bytes when !valid (src-size 0: nothing is read from src).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  // .cg: cache in L2 only; a staged chunk is read once per block from shared memory
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(dst) =
      valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif  // NTX_EMULATOR

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

// Asynchronous version of load_chunk for the vector case (vec, kc % V == 0, 16-byte aligned
// staging rows): one cp.async per 16 bytes, zero-filled outside [0, n) x [0, d). The caller
// commits the group and waits for it before reading dst.
template <typename scalar_t>
__device__ __forceinline__ void load_chunk_async(scalar_t* dst, int ld,
                                                 const scalar_t* __restrict__ src, int64_t row0,
                                                 int64_t n, int rows, int64_t k0, int64_t d,
                                                 int kc) {
  constexpr int V = 16 / sizeof(scalar_t);
  static_assert(V > 0, "vector width");
  const int kv = kc / V;
  for (int e = threadIdx.x; e < rows * kv; e += kThreads) {
    const int a = e / kv, k = (e % kv) * V;
    const int64_t row = row0 + a, col = k0 + k;
    const bool ok = row < n && col < d;
    cp_async16(dst + a * ld + k, ok ? src + row * d + col : src, ok);
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
    // acc += A_chunk @ B_chunk^T for one staged k-chunk (A [BR][LDA], B [BC][LDA]).
    auto mma_chunk = [&](const scalar_t* A, const scalar_t* B) {
#pragma unroll
      for (int kk = 0; kk < C::KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(A + warp * 16 * SM::LDA + kk),
                               SM::LDA);
#pragma unroll
        for (int n = 0; n < C::BC / 16; ++n) {
          // B[k][b] = str[b][k]: the staged [BC][KC] tile read as a col-major [KC][BC] matrix.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(B + n * 16 * SM::LDA + kk),
                                 SM::LDA);
          wmma::mma_sync(acc[n], fa, fb, acc[n]);
        }
      }
    };
    if (vec) {
      // Double-buffered: chunk k + 1 is in flight (cp.async) while chunk k is multiplied.
      constexpr int kStageElems = static_cast<int>(SM::kStage / sizeof(scalar_t));
      const int nk = static_cast<int>((d + C::KC - 1) / C::KC);
      auto issue = [&](int kc) {
        scalar_t* A = As + (kc & 1) * kStageElems;
        load_chunk_async(A, SM::LDA, own, own0, n_own, C::BR, int64_t(kc) * C::KC, d, C::KC);
        load_chunk_async(A + C::BR * SM::LDA, SM::LDA, str, str0, n_str, C::BC,
                         int64_t(kc) * C::KC, d, C::KC);
        cp_async_commit();
      };
      __syncthreads();  // previous readers of the staging region (and of B2, S) are done
      if (nk > 0) issue(0);
      for (int kc = 0; kc < nk; ++kc) {
        if (kc + 1 < nk) {
          issue(kc + 1);  // into the other buffer, freed by the barrier ending iteration kc - 1
          cp_async_wait<1>();  // this thread's copies of chunk kc have landed
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();  // ... and every thread's
        const scalar_t* A = As + (kc & 1) * kStageElems;
        mma_chunk(A, A + C::BR * SM::LDA);
        __syncthreads();  // buffer kc & 1 may be refilled (by iteration kc + 1's issue)
      }
    } else {
      for (int64_t k0 = 0; k0 < d; k0 += C::KC) {
        __syncthreads();  // previous readers of the staging buffers are done
        load_chunk(As, SM::LDA, own, own0, n_own, C::BR, k0, d, C::KC, vec);
        load_chunk(Bs, SM::LDA, str, str0, n_str, C::BC, k0, d, C::KC, vec);
        __syncthreads();
        mma_chunk(As, Bs);
      }
      // (d == 0 never gets here: vec_ok() is true for d == 0, so the branch above, whose first
      // barrier separates the previous readers of S from the store below, handles it)
    }
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
// The global-memory accumulator of the backward for d beyond the register budget (ND = 0):
// acc_buf is this split's [n_own padded to BR, dpad] region, touched by this block only.
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
#pragma unroll 1  // one A fragment live at a time: bf16 pass 2 spilled at 255 regs on sm_80
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
  // (no barrier here: the caller runs tile_dot next, whose first statement is a barrier, or ends;
  // the barrier mutation test showed this one redundant: tests/test_nt_xent_op.py)
}

// ---- backward: register-resident accumulators (ND > 0) ----
// Thread mapping of the SIMT accumulator: thread (ty, tx) owns own rows ty + 8p and d-columns
// n0 + tx + 16q of every DN-chunk n0 (the mapping of tile_grad_product).
template <typename scalar_t, int ND>
struct SimtAcc {
  using acc_t = typename Cfg<scalar_t>::acc_t;
  static constexpr int RP = Cfg<scalar_t>::BR / 8, CQ = Cfg<scalar_t>::DN / 16;
  acc_t v[ND][RP][CQ];
};

// acc[c] += G @ str[str0 .. str0 + BC)[:, c DN .. (c + 1) DN) for every d-chunk c with c DN < d.
// Starts with a block barrier (G complete before); B2 is free again once the next tile_dot's
// first barrier has passed.
template <typename scalar_t, int ND>
__device__ void grad_product_simt(SimtAcc<scalar_t, ND>& acc, const scalar_t* __restrict__ str,
                                  int64_t str0, int64_t n_str, int64_t d, bool vec,
                                  unsigned char* smem) {
  using C = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using acc_t = typename C::acc_t;
  using g_t = typename SM::g_t;
  using A = SimtAcc<scalar_t, ND>;
  scalar_t* B2 = reinterpret_cast<scalar_t*>(smem);
  const g_t* G = reinterpret_cast<const g_t*>(smem + SM::oG);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int c = 0; c < ND; ++c) {
    if (int64_t(c) * C::DN >= d) break;  // block-uniform
    __syncthreads();
    load_chunk(B2, SM::LDB2, str, str0, n_str, C::BC, int64_t(c) * C::DN, d, C::DN, vec);
    __syncthreads();
#pragma unroll 4
    for (int b = 0; b < C::BC; ++b) {
      acc_t gv[A::RP], bv[A::CQ];
#pragma unroll
      for (int p = 0; p < A::RP; ++p) gv[p] = static_cast<acc_t>(G[(ty + 8 * p) * SM::LDG + b]);
#pragma unroll
      for (int q = 0; q < A::CQ; ++q) bv[q] = static_cast<acc_t>(B2[b * SM::LDB2 + tx + 16 * q]);
#pragma unroll
      for (int p = 0; p < A::RP; ++p)
#pragma unroll
        for (int q = 0; q < A::CQ; ++q) acc.v[c][p][q] += gv[p] * bv[q];
    }
  }
  // (no barrier here: the caller runs tile_dot next, whose first statement is a barrier, or ends;
  // the barrier mutation test showed this one redundant: tests/test_nt_xent_op.py)
}

template <typename scalar_t, int ND>
__device__ void store_acc_simt(const SimtAcc<scalar_t, ND>& acc, int64_t own0, int64_t d,
                               int64_t dpad, typename Cfg<scalar_t>::acc_t* __restrict__ out) {
  using A = SimtAcc<scalar_t, ND>;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int c = 0; c < ND; ++c) {
    const int64_t n0 = int64_t(c) * Cfg<scalar_t>::DN;
    if (n0 >= d) break;
#pragma unroll
    for (int p = 0; p < A::RP; ++p)
#pragma unroll
      for (int q = 0; q < A::CQ; ++q) out[(own0 + ty + 8 * p) * dpad + n0 + tx + 16 * q] = acc.v[c][p][q];
  }
}

// B2 staging buffer i (0, 1) of the tensor-core gradient product; both live in the union
// region, free once tile_dot has ended (its last barrier).
template <typename scalar_t>
__device__ __forceinline__ scalar_t* b2_buf(unsigned char* smem, int i) {
  return reinterpret_cast<scalar_t*>(smem + i * Smem<scalar_t>::kB2);
}

// Starts the asynchronous load of d-chunk c of the streamed tile into B2 buffer c & 1 and
// commits it as one cp.async group (vector case only).
template <typename scalar_t>
__device__ __forceinline__ void issue_b2(unsigned char* smem, int c,
                                         const scalar_t* __restrict__ str, int64_t str0,
                                         int64_t n_str, int64_t d) {
  using C = Cfg<scalar_t>;
  load_chunk_async(b2_buf<scalar_t>(smem, c & 1), Smem<scalar_t>::LDB2, str, str0, n_str, C::BC,
                   int64_t(c) * C::DN, d, C::DN);
  cp_async_commit();
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// WMMA accumulator: warp w owns own rows 16 w .. 16 w + 15; f[c][n] covers d-columns
// c DN + 16 n .. + 15.
template <typename scalar_t, int ND>
struct WmmaAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[ND][Cfg<scalar_t>::DN / 16];
};

// vec: chunk 0 was issued by the caller (issue_b2 before make_g_tile, so that its load overlaps
// the softmax work); chunk c + 1 is loaded while chunk c is multiplied (double-buffered B2).
template <typename scalar_t, int ND>
__device__ void grad_product_wmma(WmmaAcc<scalar_t, ND>& acc, const scalar_t* __restrict__ str,
                                  int64_t str0, int64_t n_str, int64_t d, bool vec,
                                  unsigned char* smem) {
  namespace wmma = nvcuda::wmma;
  using C = Cfg<scalar_t>;
  using SM = Smem<scalar_t>;
  using T = typename C::wmma_t;
  using g_t = typename SM::g_t;
  const g_t* G = reinterpret_cast<const g_t*>(smem + SM::oG);
  const int warp = threadIdx.x / 32;
  const int nch = static_cast<int>((d + C::DN - 1) / C::DN);  // <= ND (host dispatch)
#pragma unroll
  for (int c = 0; c < ND; ++c) {
    if (c >= nch) break;  // block-uniform
    scalar_t* B2 = b2_buf<scalar_t>(smem, vec ? (c & 1) : 0);
    if (vec) {
      if (c + 1 < nch) {
        issue_b2(smem, c + 1, str, str0, n_str, d);  // into the buffer freed after chunk c - 1
        cp_async_wait<1>();                          // this thread's part of chunk c is in
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // every thread's part of chunk c is in; G is complete (c = 0)
    } else {
      __syncthreads();
      load_chunk(B2, SM::LDB2, str, str0, n_str, C::BC, int64_t(c) * C::DN, d, C::DN, vec);
      __syncthreads();
    }
#pragma unroll
    for (int kk = 0; kk < C::BC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(G + warp * 16 * SM::LDG + kk), SM::LDG);
#pragma unroll
      for (int n = 0; n < C::DN / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(B2 + kk * SM::LDB2 + n * 16),
                               SM::LDB2);
        wmma::mma_sync(acc.f[c][n], fa, fb, acc.f[c][n]);
      }
    }
    if (vec) __syncthreads();  // buffer c & 1 may be refilled (chunk c + 2)
  }
  // (no barrier here: the caller runs tile_dot next, whose first statement is a barrier, or ends;
  // the barrier mutation test showed this one redundant: tests/test_nt_xent_op.py)
}
#endif

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

// ---- elementwise kernels of the tiled path (nt_xent_tiled.h: the GEMMs go to cuBLAS) ----
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

inline int64_t ceil_div(int64_t a, int64_t b);

// The CUDA elementwise kernels for tiled::fwd / tiled::bwd.
struct TiledEW {
  // bf16/fp16 stay in their dtype: cuBLAS multiplies them with fp32 accumulation.
  Tensor gemm_input(const Tensor& x) const { return x.contiguous(); }
  // No range check: it would read back to the host (see the note above nt_xent_fwd_impl); the
  // kernels only compare indices with column numbers.
  void check_indices(const Tensor&, const Tensor&, int64_t) const {}
  void fwd_chunk(const Tensor& S, int64_t j0, const Tensor& inv_r, const Tensor& inv_c,
                 double inv_t, const Tensor& self, const Tensor& pos, Tensor& m, Tensor& l,
                 Tensor& pl) const {
    const int64_t R = S.size(0), nc = S.size(1);
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "nt_xent_tiled_fwd_chunk", [&] {
      NTX_LAUNCH((&tiled_fwd_chunk_kernel<scalar_t>), ceil_div(R, kWarps), 1,
          S.data_ptr<scalar_t>(), R, nc, j0, inv_r.data_ptr<scalar_t>(),
          inv_c.data_ptr<scalar_t>(), static_cast<scalar_t>(inv_t), self.data_ptr<int64_t>(),
          pos.data_ptr<int64_t>(), m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
          pl.data_ptr<scalar_t>());
    });
  }
  void bwd_chunk(const Tensor& S, Tensor& G, int64_t j0, const Tensor& inv_r,
                 const Tensor& inv_c, double inv_t, const Tensor& self, const Tensor& pos,
                 const Tensor& lse, double gscale) const {
    const int64_t R = S.size(0), nc = S.size(1);
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "nt_xent_tiled_bwd_chunk", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(),
                                      "nt_xent_tiled_bwd_chunk_g", [&] {
        NTX_LAUNCH((&tiled_bwd_chunk_kernel<acc_t, scalar_t>), ceil_div(R, kWarps), 1,
            S.data_ptr<acc_t>(), R, nc, j0, inv_r.data_ptr<acc_t>(), inv_c.data_ptr<acc_t>(),
            static_cast<acc_t>(inv_t), self.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
            lse.data_ptr<acc_t>(), static_cast<acc_t>(gscale), G.data_ptr<scalar_t>());
      });
    });
  }
};

inline std::tuple<Tensor, Tensor, Tensor, Tensor> nt_xent_tiled_fwd_impl(
    const Tensor& rows, const Tensor& cols, const Tensor& pos_idx, const Tensor& self_idx,
    double temperature, int64_t chunk) {
  return tiled::fwd(TiledEW{}, rows, cols, pos_idx, self_idx, temperature, chunk);
}

inline std::tuple<Tensor, Tensor> nt_xent_tiled_bwd_impl(
    const Tensor& grad_loss, const Tensor& rows, const Tensor& cols, const Tensor& pos_idx,
    const Tensor& self_idx, const Tensor& lse, const Tensor& inv_r, const Tensor& inv_c,
    double temperature, int64_t chunk, bool need_rows, bool need_cols) {
  return tiled::bwd(TiledEW{}, grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c,
                    temperature, chunk, need_rows, need_cols);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename scalar_t>
inline bool vec_ok(const Tensor& a, const Tensor& b) {
  constexpr int V = 16 / sizeof(scalar_t);
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr());
  const auto pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  // d == 0: nothing is loaded, and the vector branch of tile_dot is the one whose barriers
  // cover that case (its scalar WMMA branch has no barrier for an empty k-loop)
  return a.size(1) == 0 || (a.size(1) % V == 0 && pa % 16 == 0 && pb % 16 == 0);
}

// Test hook: > 0 forces this many splits (clamped to the number of streamed tiles) in every
// launch; 0 = the heuristic. Set by the emulator's set_splits op.
inline int64_t& split_override() {
  static int64_t v = 0;
  return v;
}

// Split of the streamed dimension: (splits, tiles per split). Enough blocks for one wave of
// `resident` blocks per SM, no split without a tile (splits = ceil(tiles / tps)), under gridDim.y's limit and, for the
// backward, with the [splits, own_pad, dpad] fp32 partials under kMaxPartialBytes.
inline std::pair<int64_t, int64_t> choose_split(int64_t own_blocks, int64_t str_tiles,
                                                int64_t partial_bytes_per_split,
                                                int64_t resident) {
  if (str_tiles <= 0) return {1, 1};
  int64_t want = split_override();
  if (want <= 0) {
    const int64_t target = int64_t(NTX_SM_COUNT()) * std::max<int64_t>(resident, 1);
    want = ceil_div(target, own_blocks > 0 ? own_blocks : 1);
  }
  if (partial_bytes_per_split > 0)
    want = std::min(want, std::max<int64_t>(1, kMaxPartialBytes / partial_bytes_per_split));
  want = std::max<int64_t>(1, std::min({want, str_tiles, kMaxSplits}));
  const int64_t tps = ceil_div(str_tiles, want);
  return {ceil_div(str_tiles, tps), tps};
}

// No host-side index check here: reading the indices' range back to the host would be a
// device-to-host sync in every training step (and would make the op impossible to capture in a
// CUDA graph). None is needed for memory safety: the kernels never index memory with pos_idx or
// self_idx, they only compare them with the column index of each tile element. An out-of-range
// pos_i matches no column, so its positive logit stays -inf and loss_i = +inf (a non-finite loss
// the training loop reports); an out-of-range self_i excludes no column. The indices built by
// common.losses.simclr_layout are in range by construction; a caller's own indices can be
// checked on request by the Python wrapper (nt_xent_fused(..., validate=True)), which syncs.
// tests/test_nt_xent_op.py proves, on the emulator build of this very code, that the forward and
// backward launchers make no device-to-host read at all.

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "nt_xent_fwd_cuda",
                                  [&] {
    using Cf = Cfg<scalar_t>;
    using acc_t = typename Cf::acc_t;
    const bool vec = vec_ok<scalar_t>(r, c);
    if (C > 0) {
      NTX_LAUNCH((&inv_norm_kernel<scalar_t, acc_t>), ceil_div(C, kWarps), 1,
          c.data_ptr<scalar_t>(), C, d, inv_c.data_ptr<acc_t>());
    }
    if (R == 0) return;
    NTX_LAUNCH((&inv_norm_kernel<scalar_t, acc_t>), ceil_div(R, kWarps), 1,
        r.data_ptr<scalar_t>(), R, d, inv_r.data_ptr<acc_t>());
    const int64_t row_blocks = ceil_div(R, Cf::BR);
    const auto [splits, tps] = choose_split(row_blocks, ceil_div(C, Cf::BC), 0,
                                            NTX_RESIDENT_BLOCKS(&fwd_kernel<scalar_t>));
    Tensor part = at::empty({3, splits, R}, opts);  // m, l, positive logit per split and row
    acc_t* pm = part.data_ptr<acc_t>();
    NTX_LAUNCH((&fwd_kernel<scalar_t>), row_blocks, splits,
        r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
        self.data_ptr<int64_t>(), inv_r.data_ptr<acc_t>(), inv_c.data_ptr<acc_t>(), R, C, d,
        static_cast<acc_t>(1.0 / temperature), vec, tps, pm, pm + splits * R,
        pm + 2 * splits * R);
    NTX_LAUNCH((&merge_kernel<acc_t>), ceil_div(R, kThreads), 1,
        pm, pm + splits * R, pm + 2 * splits * R, splits, R, loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>());
  });
  return {loss, lse, inv_r, inv_c};
}

// One backward pass (rows or cols side) with its split, accumulator mode and finalize.
template <typename scalar_t, bool kColSide>
void bwd_pass(const Tensor& r, const Tensor& c, const Tensor& pos, const Tensor& self,
              const Tensor& l, const Tensor& ir, const Tensor& ic, const Tensor& w_stream,
              const Tensor* scale_vec, const Tensor& scale0, double temperature, bool vec,
              Tensor& grad_out) {
  using Cf = Cfg<scalar_t>;
  using acc_t = typename Cf::acc_t;
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  const int64_t n_own = kColSide ? C : R, n_str = kColSide ? R : C;
  const int64_t dchunks = ceil_div(d, Cf::DN), dpad = dchunks * Cf::DN;
  const int64_t own_blocks = ceil_div(n_own, Cf::BR), own_pad = own_blocks * Cf::BR;
  const int nd = dchunks <= 2 ? 2 : (dchunks <= 4 && Cf::kMaxND >= 4 ? 4 : 0);
  // ND = 4 is only instantiated where Cf::kMaxND allows it (no spilling kernel is compiled)
  constexpr int kND4 = Cf::kMaxND >= 4 ? 4 : 0;
  const int64_t resident =
      nd == 2 ? NTX_RESIDENT_BLOCKS((&bwd_kernel<scalar_t, kColSide, 2>))
              : (nd == 4 ? NTX_RESIDENT_BLOCKS((&bwd_kernel<scalar_t, kColSide, kND4>))
                         : NTX_RESIDENT_BLOCKS((&bwd_kernel<scalar_t, kColSide, 0>)));
  const auto [splits, tps] = choose_split(own_blocks, ceil_div(n_str, Cf::BC),
                                          own_pad * dpad * int64_t(sizeof(acc_t)), resident);
  // Per-(split, block) partial accumulators, padded to whole tiles: O(splits (R + C) d), never
  // R x C. Only the global-memory accumulator (nd = 0) reads them before writing: zero it.
  const auto aopts = r.options().dtype(acc_type_of(r.scalar_type()));
  Tensor part = nd == 0 ? at::zeros({splits, own_pad, dpad}, aopts)
                        : at::empty({splits, own_pad, dpad}, aopts);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  auto launch = [&](auto kernel) {
    NTX_LAUNCH(kernel, own_blocks, splits, r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
        pos.data_ptr<int64_t>(), self.data_ptr<int64_t>(), l.data_ptr<acc_t>(),
        ir.data_ptr<acc_t>(), ic.data_ptr<acc_t>(), w_stream.data_ptr<acc_t>(), R, C, d, dpad,
        inv_t, vec, tps, own_pad, part.data_ptr<acc_t>());
  };
  if (nd == 2)
    launch(&bwd_kernel<scalar_t, kColSide, 2>);
  else if (nd == 4)
    launch(&bwd_kernel<scalar_t, kColSide, kND4>);
  else
    launch(&bwd_kernel<scalar_t, kColSide, 0>);
  const Tensor& x = kColSide ? c : r;
  const Tensor& inv = kColSide ? ic : ir;
  NTX_LAUNCH((&finalize_kernel<scalar_t, acc_t>), ceil_div(n_own, kWarps), 1,
      part.data_ptr<acc_t>(), splits, own_pad, dpad, x.data_ptr<scalar_t>(),
      inv.data_ptr<acc_t>(), scale_vec != nullptr ? scale_vec->data_ptr<acc_t>() : nullptr,
      scale0.data_ptr<acc_t>(), inv_t, static_cast<acc_t>(1.0 / double(Cf::kGScale)), n_own, d,
      grad_out.data_ptr<scalar_t>());
}

std::tuple<Tensor, Tensor> nt_xent_bwd_impl(const Tensor& grad_loss, const Tensor& rows,
                                            const Tensor& cols, const Tensor& pos_idx,
                                            const Tensor& self_idx, const Tensor& lse,
                                            const Tensor& inv_r, const Tensor& inv_c,
                                            double temperature, bool need_rows = true,
                                            bool need_cols = true) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  check_bwd_inputs(grad_loss, rows, cols, lse, inv_r, inv_c);
  const Tensor r = rows.contiguous(), c = cols.contiguous();
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  // (no index check: like the forward, the backward only compares pos/self with tile indices)
  const auto acc_type = acc_type_of(r.scalar_type());
  const Tensor g = grad_loss.to(acc_type).contiguous();  // mean(): a stride-0 expand
  const Tensor l = lse.contiguous(), ir = inv_r.contiguous(), ic = inv_c.contiguous();
  Tensor grad_r = at::empty({need_rows ? R : 0, d}, r.options());
  Tensor grad_c = at::empty({need_cols ? C : 0, d}, c.options());
  if (R == 0 || C == 0 || d == 0) return {grad_r.zero_(), grad_c.zero_()};
  // Streamed-side weights, normalised by their maximum so that the G tiles (rounded to fp16 /
  // bf16 for the tensor cores) neither overflow nor flush to zero whatever the norms and the
  // incoming gradient's scale; the maxima are re-applied in fp32 in finalize_kernel.
  const double tiny = acc_type == at::kDouble ? 1e-300 : 1e-30;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "nt_xent_bwd_cuda",
                                  [&] {
    const bool vec = vec_ok<scalar_t>(r, c);
    if (need_rows) {
      const Tensor smax_c = ic.amax().clamp_min(tiny);  // 0-dim, stays on the device
      const Tensor w_c = ic / smax_c;                    // [C]
      bwd_pass<scalar_t, false>(r, c, pos, self, l, ir, ic, w_c, &g, smax_c, temperature, vec,
                                grad_r);
    }
    if (need_cols) {
      const Tensor gw = g * ir;  // [R] g_i * inv_r[i]
      const Tensor smax_r = gw.abs().amax().clamp_min(tiny);
      const Tensor w_r = gw / smax_r;  // [R]
      bwd_pass<scalar_t, true>(r, c, pos, self, l, ir, ic, w_r, nullptr, smax_r, temperature,
                               vec, grad_c);
    }
  });
  return {grad_r, grad_c};
}

}  // namespace cuda_impl
}  // namespace ssl_ops
