// Host-side launch code of the CUDA kernels: the fused path's forward and backward (column split,
// accumulator choice, the kernels of fused_kernels.cuh in order) and the tiled path's elementwise
// kernels (TiledEW, for the host algorithm of nt_xent_tiled.h). The entry point of csrc/cuda/:
// it is compiled twice, by nvcc into the extension (nt_xent_cuda.cu), and by the host compiler
// into the test-only CPU emulator (tests/emu/nt_xent_emu.cpp: threads + barriers for a block, an
// emulated WMMA, deferred cp.async copies), which lets the tests check the GPU code paths -
// tiling, column splits and their merge, shared-memory layout, barriers, the cp.async waits, the
// tensor-core operand layouts - on a machine without a GPU.
//
// Before including this file, the includer defines NTX_LAUNCH(kernel_ptr, grid_x, grid_y, args...),
// NTX_SM_COUNT() (streaming multiprocessors of the current device, for the split heuristic),
// NTX_RESIDENT_BLOCKS(kernel_ptr) (blocks of kThreads threads of that kernel resident per SM) and,
// in the emulator, the CUDA built-ins the kernels use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "fused_kernels.cuh"
#include "nt_xent.h"
#include "nt_xent_tiled.h"
#include "tiled_kernels.cuh"

namespace ssl_ops {
namespace cuda_impl {

using at::Tensor;

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

template <typename scalar_t>
inline bool vec_ok(const Tensor& a, const Tensor& b) {
  constexpr int V = 16 / sizeof(scalar_t);
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr());
  const auto pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  // d == 0: nothing is loaded, and the vector branch of tile_dot is the one whose barriers
  // cover that case (its scalar WMMA branch has no barrier for an empty k-loop)
  return a.size(1) == 0 || (a.size(1) % V == 0 && pa % 16 == 0 && pb % 16 == 0);
}

// Split of the streamed dimension: (splits, tiles per split). Enough blocks for one wave of
// `resident` blocks per SM, no split without a tile (splits = ceil(tiles / tps)), under
// gridDim.y's limit and, for the backward, with the [splits, own_pad, dpad] fp32 partials under
// kMaxPartialBytes. split_override() (nt_xent.h, the set_splits op) > 0 forces the count.
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
// simclr.simclr_layout are in range by construction; a caller's own indices can be checked on
// request by the Python wrapper (nt_xent_fused(..., validate=True)), which syncs.
// tests/test_nt_xent_emu.py proves, on the emulator build of this very code, that the forward
// and backward launchers make no device-to-host read at all.

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
