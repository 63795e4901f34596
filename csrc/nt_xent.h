// Host-side declarations shared by every build of the NT-Xent op: the op schemas (define_ops,
// the table in csrc/README.md), the column-split override behind the set_splits op, the
// accumulation dtype rule and the argument checks of the CPU (cpu/nt_xent_cpu.cpp) and CUDA
// (cuda/) kernels. The test-only emulator (tests/emu/) includes it too.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace ssl_ops {

// The column split of the fused CUDA kernels (cuda/launch.cuh, choose_split): n > 0 forces n
// splits in every launch (clamped to the streamed tiles), 0 = the occupancy heuristic.
inline int64_t& split_override() {
  static int64_t v = 0;
  return v;
}

// set_splits(n) -> the previous value: sets split_override(). A test hook (the first-use check,
// common/nt_xent_check.py, forces 2 splits so that every block streams several tiles). Declared
// in every build: without CUDA kernels nothing reads the value (the CPU kernels have no column
// split), so it is a no-op there that still returns the previous value.
inline int64_t set_splits(int64_t n) {
  const int64_t old = split_override();
  split_override() = n;
  return old;
}

// The schemas of the ops, for TORCH_LIBRARY(ssl_ops) in nt_xent.cpp and the emulator's libraries.
// Kernels: TORCH_LIBRARY_IMPL(ssl_ops, CPU) in cpu/nt_xent_cpu.cpp, (ssl_ops, CUDA) in
// cuda/nt_xent_cuda.cu; fake kernels and autograd: common/nt_xent_op.py.
inline void define_ops(torch::Library& m) {
  // loss, lse, inv_r, inv_c = nt_xent_fwd(rows, cols, pos_idx, self_idx, T)
  m.def(
      "nt_xent_fwd(Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx, float temperature)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_rows, grad_cols = nt_xent_bwd(grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r,
  //                                    inv_c, T, need_rows, need_cols)
  // A gradient that is not needed is returned as an empty [0, d] tensor and its pass skipped.
  m.def(
      "nt_xent_bwd(Tensor grad_loss, Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx,"
      " Tensor lse, Tensor inv_r, Tensor inv_c, float temperature, bool need_rows=True,"
      " bool need_cols=True) -> (Tensor, Tensor)");
  // The tiled path (nt_xent_tiled.h): the same contract, columns in chunks of `chunk`.
  m.def(
      "nt_xent_tiled_fwd(Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx,"
      " float temperature, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "nt_xent_tiled_bwd(Tensor grad_loss, Tensor rows, Tensor cols, Tensor pos_idx,"
      " Tensor self_idx, Tensor lse, Tensor inv_r, Tensor inv_c, float temperature, int chunk,"
      " bool need_rows=True, bool need_cols=True) -> (Tensor, Tensor)");
  m.def("set_splits(int n) -> int", &set_splits);
}

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
