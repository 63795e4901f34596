// CUDA kernels of the NT-Xent op, registered as TORCH_LIBRARY_IMPL(ssl_ops, CUDA) (schemas:
// nt_xent.h's define_ops; CPU kernels: cpu/nt_xent_cpu.cpp). Only CUDA builds compile this file.
// It defines the launch macros for nvcc and includes the kernels and their launch code:
//   fused_config.cuh  tile sizes, resident-block promises, shared-memory layout
//   fused_tiles.cuh   block-level building blocks (staging loads, dot-product tile, G @ tile)
//   fused_kernels.cuh the fused kernels below
//   tiled_kernels.cuh the tiled path's two elementwise kernels
//   launch.cuh        the host-side launchers of both paths (also compiled into the emulator)
//
// The fused path: same algorithm as the CPU kernels, flash-attention style, never an R x C
// buffer:
//   inv_norm_kernel : inv[i] = 1 / max(||x_i||, eps), one warp per row.
//   fwd_kernel      : grid (row blocks of BR anchors, column splits). Each block streams the
//                     column tiles of its split (flash-decoding: the grid fills the GPU even when
//                     R << C, e.g. one rank of 8 with 1,024 rows against 8,192 gathered columns);
//                     the tile of raw dot products S [BR, BC] is computed with tensor cores
//                     (bf16/fp16, WMMA 16x16x16, fp32 accumulate) or SIMT FMAs (fp32, fp64) into
//                     shared memory; each warp turns its 16 rows into logits (self column -inf);
//                     every lane keeps a running (max, sum) per row over its own columns, merged
//                     across the warp once at the end. Writes per-split partials (max, sum,
//                     positive logit) per row.
//   merge_kernel    : combines the splits of each row in split order (deterministic): lse, loss.
//   bwd_kernel      : grid (own blocks of BR vectors, streamed splits); own = rows in pass 1,
//                     cols in pass 2. Recomputes S for each streamed tile, forms
//                     G = (softmax - onehot(pos)) * w_stream in shared memory (input dtype for the
//                     tensor cores) and accumulates G @ stream_tile into a [BR, d] fp32
//                     accumulator held in registers (d <= 256 bf16 / 128 fp32; a global buffer
//                     beyond), stored once per block into its split's partial buffer.
//   finalize_kernel : sums the splits' partials in split order, scales, and applies the Jacobian
//                     of x / max(||x||, eps). Deterministic, no atomics.
// All launches go to the current stream; all offsets are 64-bit, gridDim.y (splits) <= 65,535.
// The kernels and their launch code live in the headers above, shared with the test-only CPU
// emulator (tests/emu/nt_xent_emu.cpp) that checks this code path where no GPU is available.
//
// Logits are pre-scaled by log2(e) / T (folded into the per-column factor), so every softmax
// term is one exp2f; lse and the positive logit leave the kernels in natural-log units.
//
// bf16/fp16 (the training path): the k-chunks of the dot-product tile and the d-chunks of the
// streamed tile for G @ tile are double-buffered with cp.async (the next chunk loads while the
// tensor cores work on the current one; the first d-chunk loads while G is computed).
//
// Known limits (correctness first; nothing here has been profiled on a GPU yet): WMMA through
// shared memory rather than register-resident mma.sync/wgmma operand tiles, two barriers per
// chunk, the own tile is re-staged for every streamed tile (keeping it resident needs dynamic
// shared memory beyond 48 KiB), and the fp32/fp64 SIMT path loads synchronously.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream; ATen/cuda/CUDAContext.h is
// avoided because it needs the cuBLAS / cuSPARSE headers, which a minimal toolkit may lack.
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

// Every launch goes to the current stream and is checked.
#define NTX_LAUNCH(kernel, grid_x, grid_y, ...)                                               \
  do {                                                                                        \
    auto* ntx_k_ = kernel;                                                                    \
    const dim3 ntx_grid_(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));       \
    ntx_k_<<<ntx_grid_, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                           \
  } while (0)

// Streaming multiprocessors of the current device (the split heuristic's target).
inline int ntx_sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n > 0 ? n : 1;
}
#define NTX_SM_COUNT() ntx_sm_count()

// Blocks of 128 threads of `kernel` that fit on one SM, from the compiled kernel's registers and
// shared memory (the occupancy calculator; a host-side query, no device work, no sync).
template <typename K>
int ntx_resident_blocks(K* kernel) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &n, reinterpret_cast<const void*>(kernel), 128, 0));
  return n > 0 ? n : 1;
}
#define NTX_RESIDENT_BLOCKS(kernel) ntx_resident_blocks(kernel)

#include "launch.cuh"

namespace ssl_ops {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> nt_xent_fwd_cuda(const Tensor& rows, const Tensor& cols,
                                                            const Tensor& pos_idx,
                                                            const Tensor& self_idx,
                                                            double temperature) {
  const c10::cuda::CUDAGuard guard(rows.device());
  return cuda_impl::nt_xent_fwd_impl(rows, cols, pos_idx, self_idx, temperature);
}

std::tuple<Tensor, Tensor> nt_xent_bwd_cuda(const Tensor& grad_loss, const Tensor& rows,
                                            const Tensor& cols, const Tensor& pos_idx,
                                            const Tensor& self_idx, const Tensor& lse,
                                            const Tensor& inv_r, const Tensor& inv_c,
                                            double temperature, bool need_rows, bool need_cols) {
  const c10::cuda::CUDAGuard guard(rows.device());
  return cuda_impl::nt_xent_bwd_impl(grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c,
                                     temperature, need_rows, need_cols);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nt_xent_tiled_fwd_cuda(
    const Tensor& rows, const Tensor& cols, const Tensor& pos_idx, const Tensor& self_idx,
    double temperature, int64_t chunk) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // inner ATen ops: no graph
  return cuda_impl::nt_xent_tiled_fwd_impl(rows, cols, pos_idx, self_idx, temperature, chunk);
}

std::tuple<Tensor, Tensor> nt_xent_tiled_bwd_cuda(const Tensor& grad_loss, const Tensor& rows,
                                                  const Tensor& cols, const Tensor& pos_idx,
                                                  const Tensor& self_idx, const Tensor& lse,
                                                  const Tensor& inv_r, const Tensor& inv_c,
                                                  double temperature, int64_t chunk,
                                                  bool need_rows, bool need_cols) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  return cuda_impl::nt_xent_tiled_bwd_impl(grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r,
                                           inv_c, temperature, chunk, need_rows, need_cols);
}

TORCH_LIBRARY_IMPL(ssl_ops, CUDA, m) {
  m.impl("nt_xent_fwd", &nt_xent_fwd_cuda);
  m.impl("nt_xent_bwd", &nt_xent_bwd_cuda);
  m.impl("nt_xent_tiled_fwd", &nt_xent_tiled_fwd_cuda);
  m.impl("nt_xent_tiled_bwd", &nt_xent_tiled_bwd_cuda);
}

}  // namespace ssl_ops
