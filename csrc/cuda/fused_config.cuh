// Tile configuration of the fused CUDA kernels: block size, resident-block promises, column-split
// limits, the tile sizes per dtype (Cfg) and the shared-memory layout of a block (Smem).
//
// Included by fused_tiles.cuh (and through it by everything in csrc/cuda/). The includer provides
// the CUDA types __nv_bfloat16 / __half (cuda_bf16.h, cuda_fp16.h; the emulator aliases them to
// c10's). bench/resource_table.py reads kMinBlocks and bwd_min_blocks() from this file.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace ssl_ops {
namespace cuda_impl {

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

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

}  // namespace cuda_impl
}  // namespace ssl_ops
