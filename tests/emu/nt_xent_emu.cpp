// Test-only CPU emulator of the CUDA kernels in csrc/cuda/ (not part of the extension): the
// emulated CUDA is in cuda_emu.h, the race checker in race_checker.h, this file compiles the
// kernels and their launchers (csrc/cuda/launch.cuh) against them and registers the ops.
//
// The GPU code cannot run where there is no GPU, but its logic - tile loops, shared-memory
// layout and aliasing, the placement of every __syncthreads, the warp shuffles, the WMMA
// operand layouts (row/col-major, leading dimensions, offsets), the 64-bit indexing and the host
// launch code - can. This file compiles the very same headers with the host compiler, with:
//   - a block = 128 std::threads; __syncthreads = a std::barrier over them; blocks run one
//     after the other, so a static array stands in for __shared__ memory; __syncwarp = a barrier
//     over the 32 threads of the warp;
//   - __shfl_xor_sync = an exchange through a per-warp buffer between two warp barriers;
//   - nvcuda::wmma = each lane holds the whole 16x16 tile and computes it (fp32 products of the
//     exact bf16/fp16 inputs, as the tensor cores), lane 0 stores it;
//   - cp.async = a copy queued per thread and performed only by the cp.async.wait_group that
//     retires its group, so a staged buffer read before its wait holds stale data (as it may on
//     the GPU) and the test fails;
//   - __CUDA_ARCH__ = 900, so the sm_90 (tensor-core) paths are the ones compiled.
//   - shared memory = one buffer per launch (NTX_SMEM), filled with 0xFF bytes (NaN, -1) at the
//     start so that a read of something never written shows up in the result;
//   - __syncthreads() = ntx_emu::syncthreads(id): each barrier is known by an id, its header's
//     number and its line there (cuda_emu.h, kBarrierHeaders), and set_disabled_barrier(id)
//     removes exactly that one (all threads skip it), which turns one build into every "one
//     barrier removed" mutant.
// A missing barrier shows up as a race or a deadlock here, a wrong layout as a wrong result.
//
// Race checker (built with -DNTX_EMU_RACE=1 -fsanitize=thread, as torch.ops.ssl_ops_emu_race):
// GCC's ThreadSanitizer instrumentation turns every load and store of this translation unit into
// a call to __tsan_readN / __tsan_writeN; no TSan runtime is linked, race_checker.h has ours.
// For addresses in the launch's shared memory they keep a shadow per byte: the last writer and
// the barrier interval (epoch) of its write, and the reader(s) of the current interval. Two
// accesses by different threads in one interval, at least one a write, are reported (read after
// write, write after read, write after write), whatever order the threads ran in: the check is
// by interval, not by timing. A cp.async copy is a write in every interval from its issue to the
// wait that retires it (it may land at any point in between); its data lands at the issue
// (race_mode 1) or at the wait (race_mode 2), so the two runs also see both values.
// Built on demand by tests/test_nt_xent_emu.py (torch.utils.cpp_extension.load, csrc/ on the
// include path), registered as torch.ops.ssl_ops_emu.* (the extension's ops, csrc/nt_xent.h's
// define_ops, on CPU tensors, plus the test hooks below).
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cuda_emu.h"  // first: the CUDA built-ins the kernels use
// The kernels and their launchers, with __CUDA_ARCH__ = 900 (the sm_90 tensor-core paths).
#include "cuda/launch.cuh"
#include "race_checker.h"

static_assert(ssl_ops::cuda_impl::kThreads == ntx_emu::kBlock, "block size");

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_fwd(const at::Tensor& rows,
                                                                   const at::Tensor& cols,
                                                                   const at::Tensor& pos_idx,
                                                                   const at::Tensor& self_idx,
                                                                   double temperature) {
  return ssl_ops::cuda_impl::nt_xent_fwd_impl(rows, cols, pos_idx, self_idx, temperature);
}

std::tuple<at::Tensor, at::Tensor> emu_bwd(const at::Tensor& grad_loss, const at::Tensor& rows,
                                           const at::Tensor& cols, const at::Tensor& pos_idx,
                                           const at::Tensor& self_idx, const at::Tensor& lse,
                                           const at::Tensor& inv_r, const at::Tensor& inv_c,
                                           double temperature, bool need_rows, bool need_cols) {
  return ssl_ops::cuda_impl::nt_xent_bwd_impl(grad_loss, rows, cols, pos_idx, self_idx, lse,
                                              inv_r, inv_c, temperature, need_rows, need_cols);
}

// ---- device-to-host reads made by the launcher code ----
// Every ATen op the launchers call goes through the dispatcher, and a thread-local
// RecordFunction callback sees each of them (also those called from C++, which a Python dispatch
// mode would not). Counted as a device-to-host read (a host sync on a GPU): reading a scalar
// (aten::_local_scalar_dense, what .item() and bool(tensor) run; aten::item, aten::is_nonzero,
// aten::equal), ops whose output size depends on the data (aten::nonzero, aten::unique*,
// aten::masked_select), and copies to the host (aten::cpu, or aten::to / aten::_to_copy /
// aten::_copy_from with a CPU device argument). In the emulator every tensor is a CPU tensor, so
// a plain dst.copy_(src) into a host tensor cannot be told apart from a device copy; the launchers
// use none.
std::vector<std::string> host_reads;
std::optional<at::CallbackHandle> host_read_cb;

bool is_host_read(const at::RecordFunction& fn) {
  const std::string name = fn.name();
  for (const char* n : {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
                        "aten::equal", "aten::nonzero", "aten::masked_select", "aten::cpu"})
    if (name == n) return true;
  if (name.rfind("aten::unique", 0) == 0) return true;
  if (name == "aten::to" || name == "aten::_to_copy" || name.rfind("aten::_copy_from", 0) == 0) {
    for (const c10::IValue& v : fn.inputs())
      if (v.isDevice() && v.toDevice().is_cpu()) return true;
  }
  return false;
}

std::unique_ptr<at::ObserverContext> on_op(const at::RecordFunction& fn) {
  if (is_host_read(fn)) host_reads.emplace_back(fn.name());
  return nullptr;
}

// Starts recording the device-to-host reads of ops run on this thread.
void emu_host_reads_start() {
  host_reads.clear();
  if (!host_read_cb)
    host_read_cb = at::addThreadLocalCallback(
        at::RecordFunctionCallback(&on_op).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
}

// Stops recording; returns the names of the reads seen since the start.
std::vector<std::string> emu_host_reads_stop() {
  if (host_read_cb) at::removeCallback(*host_read_cb);
  host_read_cb.reset();
  return std::move(host_reads);
}

// Barrier mutants: skip the __syncthreads() with this id (0: none); returns the old one.
int64_t emu_set_disabled_barrier(int64_t id) {
  return ntx_emu::disabled_barrier.exchange(static_cast<int>(id));
}

// Ids of the barriers executed since the last call (then forgotten).
std::vector<int64_t> emu_barrier_lines() {
  std::vector<int64_t> out;
  for (int id = 0; id < ntx_emu::kMaxBarrierIds; ++id)
    if (ntx_emu::barrier_seen[id].exchange(false)) out.push_back(id);
  return out;
}

#ifdef NTX_EMU_RACE
// 0: race checking off; 1: on, cp.async data lands at the issue; 2: on, lands at the wait.
// Switching it on clears the shadow and the reports. Returns the old mode.
int64_t emu_race_mode(int64_t m) {
  if (m != 0) ntx_emu::race::reset_shadow();
  return ntx_emu::race::mode.exchange(static_cast<int>(m));
}

// The races found since race checking was switched on: the total count first, then up to 64
// reports "KIND at shared byte OFFSET: thread A vs thread B, after the barrier at HEADER:LINE".
std::vector<std::string> emu_races() {
  std::vector<std::string> out{std::to_string(ntx_emu::race::n_races)};
  for (int i = 0; i < ntx_emu::race::n_reports; ++i) {
    const auto& r = ntx_emu::race::reports[i];
    out.push_back(std::string(r.kind) + " at shared byte " + std::to_string(r.offset) +
                  ": thread " + std::to_string(r.t_now) + " vs thread " +
                  std::to_string(r.t_other) + ", after the barrier at " +
                  ntx_emu::barrier_name(r.barrier));
  }
  return out;
}
#endif

}  // namespace

// The plain build registers torch.ops.ssl_ops_emu, the race-checking one ssl_ops_emu_race (both
// can be loaded in one process).
#ifdef NTX_EMU_RACE
#define NTX_EMU_LIB ssl_ops_emu_race
#else
#define NTX_EMU_LIB ssl_ops_emu
#endif
#define NTX_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define NTX_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

NTX_TORCH_LIBRARY(NTX_EMU_LIB, m) {
  ssl_ops::define_ops(m);  // the extension's schemas, set_splits (0 = the 132-SM heuristic) included
  m.def("host_reads_start() -> ()", &emu_host_reads_start);
  m.def("host_reads_stop() -> str[]", &emu_host_reads_stop);
  m.def("set_disabled_barrier(int id) -> int", &emu_set_disabled_barrier);
  m.def("barrier_lines() -> int[]", &emu_barrier_lines);
#ifdef NTX_EMU_RACE
  m.def("race_mode(int mode) -> int", &emu_race_mode);
  m.def("races() -> str[]", &emu_races);
#endif
}

NTX_TORCH_LIBRARY_IMPL(NTX_EMU_LIB, CPU, m) {
  m.impl("nt_xent_fwd", &emu_fwd);
  m.impl("nt_xent_bwd", &emu_bwd);
  m.impl("nt_xent_tiled_fwd", [](const at::Tensor& r, const at::Tensor& c, const at::Tensor& p,
                                 const at::Tensor& s, double t, int64_t chunk) {
    const at::AutoDispatchBelowADInplaceOrView no_autograd;
    return ssl_ops::cuda_impl::nt_xent_tiled_fwd_impl(r, c, p, s, t, chunk);
  });
  m.impl("nt_xent_tiled_bwd",
         [](const at::Tensor& g, const at::Tensor& r, const at::Tensor& c, const at::Tensor& p,
            const at::Tensor& s, const at::Tensor& lse, const at::Tensor& ir,
            const at::Tensor& ic, double t, int64_t chunk, bool nr, bool nc) {
           const at::AutoDispatchBelowADInplaceOrView no_autograd;
           return ssl_ops::cuda_impl::nt_xent_tiled_bwd_impl(g, r, c, p, s, lse, ir, ic, t, chunk,
                                                             nr, nc);
         });
}
