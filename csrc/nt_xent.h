// Host-side declarations shared by the CPU (nt_xent.cpp) and CUDA (nt_xent_cuda.cu) kernels of
// the fused NT-Xent op: argument checks and the accumulation dtype rule.
#pragma once

#include <ATen/ATen.h>

namespace ssl_ops {

// fp32 accumulation for fp32/bf16/fp16 inputs, fp64 for fp64 (gradcheck).
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& pos_idx,
                         const at::Tensor& self_idx, double temperature) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2, "nt_xent: rows and cols must be 2-D, got ",
              rows.sizes(), " and ", cols.sizes());
  TORCH_CHECK(rows.size(1) == cols.size(1), "nt_xent: rows [R, d] and cols [C, d] differ in d: ",
              rows.size(1), " vs ", cols.size(1));
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), "nt_xent: rows and cols dtypes differ: ",
              rows.scalar_type(), " vs ", cols.scalar_type());
  const auto t = rows.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "nt_xent: unsupported dtype ", t);
  TORCH_CHECK(pos_idx.dim() == 1 && self_idx.dim() == 1 && pos_idx.size(0) == rows.size(0) &&
                  self_idx.size(0) == rows.size(0),
              "nt_xent: pos_idx and self_idx must be [R] with R = rows.size(0) = ", rows.size(0));
  TORCH_CHECK(pos_idx.scalar_type() == at::kLong && self_idx.scalar_type() == at::kLong,
              "nt_xent: pos_idx and self_idx must be int64");
  TORCH_CHECK(rows.device() == cols.device() && rows.device() == pos_idx.device() &&
                  rows.device() == self_idx.device(),
              "nt_xent: all inputs must be on the same device");
  TORCH_CHECK(temperature > 0, "nt_xent: temperature must be > 0, got ", temperature);
  TORCH_CHECK(cols.size(0) > 0 || rows.size(0) == 0,
              "nt_xent: no columns (C == 0): every row needs its positive among the columns");
}

inline void check_bwd_inputs(const at::Tensor& grad_loss, const at::Tensor& rows,
                             const at::Tensor& cols, const at::Tensor& lse,
                             const at::Tensor& inv_r, const at::Tensor& inv_c) {
  const auto acc = acc_type_of(rows.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows.size(0),
              "nt_xent_bwd: grad_loss must be [R]");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows.size(0) && inv_r.dim() == 1 &&
                  inv_r.size(0) == rows.size(0) && inv_c.dim() == 1 &&
                  inv_c.size(0) == cols.size(0),
              "nt_xent_bwd: lse/inv_r must be [R] and inv_c [C]");
  TORCH_CHECK(lse.scalar_type() == acc && inv_r.scalar_type() == acc &&
                  inv_c.scalar_type() == acc,
              "nt_xent_bwd: saved statistics must be ", acc);
}

}  // namespace ssl_ops
