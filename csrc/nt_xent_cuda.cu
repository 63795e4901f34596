// CUDA kernels of the fused NT-Xent op (schemas and CPU kernels: nt_xent.cpp).
//
// Same algorithm as the CPU path, flash-attention style, never an R x C buffer:
//   inv_norm_kernel : inv[i] = 1 / max(||x_i||, eps), one warp per row.
//   fwd_kernel      : one block per BR anchors; streams column tiles of BC candidates; the tile of
//                     raw dot products S [BR, BC] is computed with tensor cores (bf16/fp16, WMMA
//                     16x16x16, fp32 accumulate) or SIMT FMAs (fp32, fp64) into shared memory;
//                     each warp then turns its 16 rows into logits (self column -inf); every lane
//                     keeps a running (max, sum) per row over its own columns, merged across the
//                     warp once at the end (no shuffles in the tile loop). Writes loss and lse [R].
//   bwd_kernel      : one block per BR "own" vectors (rows in pass 1, cols in pass 2); streams the
//                     other side in tiles of BC, recomputes S, forms
//                     G = (softmax - onehot(pos)) * w_stream in shared memory (input dtype for the
//                     tensor cores) and accumulates G @ stream_tile into an fp32 [own, d] buffer
//                     owned by this block only: deterministic, no atomics.
//   finalize_kernel : scales the accumulator and applies the Jacobian of x / max(||x||, eps).
// All launches go to the current stream; all offsets are 64-bit. The kernels and their launch
// code live in nt_xent_kernels.cuh, shared with the CPU emulator csrc/emu/nt_xent_emu.cpp that the
// tests use to check this code path where no GPU is available.
//
// Known limits of this first version (correctness first, not yet profiled on a GPU): WMMA through
// shared memory rather than register-resident mma.sync/wgmma tiles, no cp.async pipelining, and
// the operand tiles are re-staged for every streamed tile.
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
#define NTX_LAUNCH(kernel, grid, ...)                                                         \
  do {                                                                                        \
    auto* ntx_k_ = kernel;                                                                    \
    ntx_k_<<<(grid), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);          \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                           \
  } while (0)

#include "nt_xent_kernels.cuh"

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
                                            double temperature) {
  const c10::cuda::CUDAGuard guard(rows.device());
  return cuda_impl::nt_xent_bwd_impl(grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c,
                                     temperature);
}

TORCH_LIBRARY_IMPL(ssl_ops, CUDA, m) {
  m.impl("nt_xent_fwd", &nt_xent_fwd_cuda);
  m.impl("nt_xent_bwd", &nt_xent_bwd_cuda);
}

}  // namespace ssl_ops
