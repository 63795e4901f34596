// Block-level building blocks of the fused CUDA kernels (fused_kernels.cuh): the cp.async
// staging copies, warp reductions, the global -> shared tile loads, the dot-product tile
// S = own . stream^T (tile_dot: WMMA tensor cores for bf16/fp16, SIMT FMAs for fp32/fp64) and the
// backward's gradient products G @ stream tile (register-resident SIMT / WMMA accumulators, or a
// global-memory accumulator for large d).
//
// Every __syncthreads() here and in fused_kernels.cuh is one the test-only emulator
// (tests/emu/) knows by its header and line: tests/test_nt_xent_emu.py removes each one in turn
// and requires the race checker to report the mutant.
#pragma once

#include <cstdint>

#include "fused_config.cuh"

namespace ssl_ops {
namespace cuda_impl {

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
  // the barrier mutation test showed this one redundant: tests/test_nt_xent_emu.py)
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
  // the barrier mutation test showed this one redundant: tests/test_nt_xent_emu.py)
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
  // the barrier mutation test showed this one redundant: tests/test_nt_xent_emu.py)
}
#endif

}  // namespace cuda_impl
}  // namespace ssl_ops
