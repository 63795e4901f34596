// The tiled NT-Xent path: the dot products go to the library GEMM (at::mm: cuBLAS on CUDA, the
// CPU BLAS on the CPU), whose throughput is known, and a per-device elementwise kernel does the
// part no library does (scale, self mask, positive pick, online log-sum-exp; softmax - onehot).
// One host algorithm for every device, parameterised by the elementwise kernels `EW`:
//   CPU  : cpu/nt_xent_cpu.cpp (loops over rows, at::parallel_for), registered as the CPU kernel
//          of ssl_ops::nt_xent_tiled_fwd / _bwd: a second CPU implementation next to the fused one;
//   CUDA : cuda/tiled_kernels.cuh (one warp per row), launched by cuda/launch.cuh's TiledEW, also
//          compiled into the CPU emulator.
//
// Columns are processed in chunks of `chunk` columns (the caller sizes them under a memory
// budget, common/nt_xent_op.py), so memory is O((R + C) d + R chunk), never R x C:
//   forward, per chunk : S = X_R X_chunk^T [R, chunk] (bf16/fp16 in, fp32 accumulate and out),
//                        then ew.fwd_chunk: logits = S inv_r inv_c / T, self column -inf, the
//                        positive logit picked, the running (max, sum) of each row updated.
//   backward, per chunk: S recomputed, ew.bwd_chunk forms G = (softmax - onehot) * gscale in the
//                        GEMM dtype, then two GEMMs: A += G (X_chunk inv_c) [R, d] (the rows'
//                        gradient, accumulated in fp32 over the chunks) and
//                        B_chunk = G^T (X_R g inv_r / max) [chunk, d] (the chunk's columns'
//                        gradient, complete at once: G holds every row). 3 GEMMs of 2 R chunk d
//                        FLOPs per chunk: 8 R C d in all with the forward (the fused kernels'
//                        two-pass backward executes 10 R C d).
//   The normalisation's backward (x / max(||x||, eps)) is applied at the end with ATen ops.
// Deterministic (fixed chunk order, no atomics) for a fixed chunk size.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "nt_xent.h"
#include "nt_xent_tile.h"

namespace ssl_ops {
namespace tiled {

using at::Tensor;

// a @ b in the accumulation dtype: bf16/fp16 operands with fp32 accumulation and output
// (cuBLAS through aten::mm.dtype on CUDA; in the CPU emulator, whose "device" tensors are CPU
// tensors, the same numerics from fp32 copies of the rounded operands).
inline Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  if (a.is_cuda()) return at::mm(a, b, acc);
  return at::mm(a.to(acc), b.to(acc));
}

// acc += a @ b with acc in the accumulation dtype. On CUDA with bf16/fp16 operands: one cuBLAS
// GEMM with beta = 1 into the fp32 accumulator (aten::addmm.dtype_out), no [R, d] temporary; a
// build whose addmm lacks that overload raises at the call (a host-side check, no device
// fault) and the temporary is used instead.
inline void mm_acc_add(Tensor& acc, const Tensor& a, const Tensor& b) {
  if (a.is_cuda() && a.scalar_type() != acc.scalar_type()) {
    try {
      at::addmm_out(acc, acc, a, b, acc.scalar_type());
      return;
    } catch (const c10::Error&) {
    }
  }
  acc.add_(mm_acc(a, b, acc.scalar_type()));
}

// 1 / max(||x_i||, eps) per row, in acc.
inline Tensor inv_norms(const Tensor& x, at::ScalarType acc) {
  return at::linalg_vector_norm(x.to(acc), 2, {1}).clamp_min(ntx::kNormEps).reciprocal();
}

// grad_x = normalize_backward(gx, x inv, <gx, x inv>, inv) row by row (ntx::normalize_backward):
// gx [n, d] in acc is the gradient w.r.t. the normalised vectors.
inline Tensor finalize(const Tensor& gx, const Tensor& x, const Tensor& inv) {
  const Tensor xa = x.to(gx.scalar_type());
  const Tensor xhat = xa * inv.unsqueeze(1);
  const Tensor dot = (gx * xhat).sum(1, true);
  const Tensor clamped = xa.square().sum(1, true).sqrt().le(ntx::kNormEps);
  return at::where(clamped, gx, gx - xhat * dot).mul_(inv.unsqueeze(1)).to(x.scalar_type());
}

inline int64_t check_chunk(int64_t chunk) {
  TORCH_CHECK(chunk > 0, "nt_xent_tiled: chunk must be > 0, got ", chunk);
  return chunk;
}

// Returns (loss [R], lse [R], inv_r [R], inv_c [C]) in the accumulation dtype.
template <class EW>
std::tuple<Tensor, Tensor, Tensor, Tensor> fwd(const EW& ew, const Tensor& rows, const Tensor& cols,
                                               const Tensor& pos_idx, const Tensor& self_idx,
                                               double temperature, int64_t chunk) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  check_chunk(chunk);
  const auto acc = acc_type_of(rows.scalar_type());
  const Tensor r = ew.gemm_input(rows), c = ew.gemm_input(cols);
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  ew.check_indices(pos, self, c.size(0));
  const int64_t R = r.size(0), C = c.size(0);
  const auto opts = rows.options().dtype(acc);
  const Tensor inv_r = inv_norms(rows, acc), inv_c = inv_norms(cols, acc);
  Tensor m = at::full({R}, -INFINITY, opts), l = at::zeros({R}, opts);
  Tensor pl = at::full({R}, -INFINITY, opts);
  if (R > 0) {
    for (int64_t j0 = 0; j0 < C; j0 += chunk) {
      const int64_t cc = std::min(chunk, C - j0);
      const Tensor S = mm_acc(r, c.narrow(0, j0, cc).t(), acc).contiguous();  // [R, cc]
      ew.fwd_chunk(S, j0, inv_r, inv_c, 1.0 / temperature, self, pos, m, l, pl);
    }
  }
  const Tensor lse = m + l.log();  // l == 0 (no candidate) gives -inf, as lse_finish
  return {lse - pl, lse, inv_r, inv_c};
}

// Returns (grad_rows [R, d], grad_cols [C, d]) in the input dtype ([0, d] when not needed).
template <class EW>
std::tuple<Tensor, Tensor> bwd(const EW& ew, const Tensor& grad_loss, const Tensor& rows,
                               const Tensor& cols, const Tensor& pos_idx, const Tensor& self_idx,
                               const Tensor& lse, const Tensor& inv_r, const Tensor& inv_c,
                               double temperature, int64_t chunk, bool need_rows,
                               bool need_cols) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  check_bwd_inputs(grad_loss, rows, cols, lse, inv_r, inv_c);
  check_chunk(chunk);
  const auto acc = acc_type_of(rows.scalar_type());
  const Tensor r = ew.gemm_input(rows), c = ew.gemm_input(cols);
  const auto gemm_t = r.scalar_type();
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  Tensor grad_r = at::empty({need_rows ? R : 0, d}, rows.options());
  Tensor grad_c = at::empty({need_cols ? C : 0, d}, cols.options());
  if (R == 0 || C == 0 || d == 0) return {grad_r.zero_(), grad_c.zero_()};
  const double inv_t = 1.0 / temperature;
  // G is stored in the GEMM dtype; fp16 G times 2^14 so that small probabilities stay normal
  // (as the fused kernels' kGScale), divided out in fp32 below.
  const double gscale = gemm_t == at::kHalf ? 16384.0 : 1.0;
  const Tensor g = grad_loss.to(acc).contiguous();
  // Row side of B = G^T (X_R g inv_r): normalised by its maximum so that the GEMM operand
  // neither overflows nor flushes in bf16 / fp16 whatever the incoming gradient's scale.
  const Tensor gw = g * inv_r;
  const Tensor smax = gw.abs().amax().clamp_min(acc == at::kDouble ? 1e-300 : 1e-30);
  const Tensor rw = need_cols ? (r.to(acc) * (gw / smax).unsqueeze(1)).to(gemm_t) : Tensor();
  Tensor A = need_rows ? at::zeros({R, d}, rows.options().dtype(acc)) : Tensor();
  Tensor G = at::empty({R, std::min(chunk, C)}, r.options());
  for (int64_t j0 = 0; j0 < C; j0 += chunk) {
    const int64_t cc = std::min(chunk, C - j0);
    const Tensor cch = c.narrow(0, j0, cc);
    const Tensor S = mm_acc(r, cch.t(), acc).contiguous();  // [R, cc], recomputed
    Tensor Gc = cc == G.size(1) ? G : G.narrow(1, 0, cc).contiguous();
    ew.bwd_chunk(S, Gc, j0, inv_r, inv_c, inv_t, self, pos, lse, gscale);
    if (need_rows) {
      const Tensor cs = (cch.to(acc) * inv_c.narrow(0, j0, cc).unsqueeze(1)).to(gemm_t);
      mm_acc_add(A, Gc, cs);  // [R, d] += [R, cc] @ [cc, d]
    }
    if (need_cols) {
      const Tensor B = mm_acc(Gc.t(), rw, acc).mul_(smax * (inv_t / gscale));  // [cc, d]
      grad_c.narrow(0, j0, cc).copy_(finalize(B, cols.narrow(0, j0, cc),
                                              inv_c.narrow(0, j0, cc)));
    }
  }
  if (need_rows) grad_r.copy_(finalize(A.mul_((g * (inv_t / gscale)).unsqueeze(1)), rows, inv_r));
  return {grad_r, grad_c};
}

}  // namespace tiled
}  // namespace ssl_ops
