// Test-only CPU emulator of the CUDA kernels in ../nt_xent_kernels.cuh.
//
// The GPU code cannot run where there is no GPU, but its logic - tile loops, shared-memory
// layout and aliasing, the placement of every __syncthreads, the warp shuffles, the WMMA
// operand layouts (row/col-major, leading dimensions, offsets), the 64-bit indexing and the host
// launch code - can. This file compiles the very same header with the host compiler, with:
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
// A missing barrier shows up as a race or a deadlock here, a wrong layout as a wrong result.
// Built on demand by tests/test_nt_xent_op.py (torch.utils.cpp_extension.load), registered as
// torch.ops.ssl_ops_emu.nt_xent_fwd / nt_xent_bwd on CPU tensors. Not part of the extension.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace ntx_emu {

constexpr int kBlock = 128;
constexpr int kWarp = 32;

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 thread_idx, block_idx;

struct BlockCtx {
  std::barrier<> block{kBlock};
  std::unique_ptr<std::barrier<>> warp[kBlock / kWarp];
  alignas(8) unsigned char shfl[kBlock / kWarp][kWarp][8];
  BlockCtx() {
    for (auto& w : warp) w = std::make_unique<std::barrier<>>(kWarp);
  }
};
inline thread_local BlockCtx* ctx = nullptr;

inline void syncthreads() {
  ctx->block.arrive_and_wait();
}

inline void syncwarp() {
  ctx->warp[thread_idx.x / kWarp]->arrive_and_wait();
}

template <typename T>
T shfl_xor(T v, int o) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int t = static_cast<int>(thread_idx.x), w = t / kWarp, l = t % kWarp;
  std::memcpy(ctx->shfl[w][l], &v, sizeof(T));
  ctx->warp[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, ctx->shfl[w][l ^ o], sizeof(T));
  ctx->warp[w]->arrive_and_wait();
  return r;
}

// cp.async: per-thread queue of committed groups of 16-byte copies (src == nullptr: zero fill).
struct AsyncCopy {
  void* dst;
  const void* src;
};
inline thread_local std::vector<AsyncCopy> pending_copies;
inline thread_local std::deque<std::vector<AsyncCopy>> copy_groups;

// kernel<<<dim3(gx, gy), 128>>>(args...): 128 threads, which run the blocks one after the other
// (x fastest). The grid limits of the GPU are checked as a launch would.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), int64_t gx, int64_t gy, A&&... args) {
  if (gx <= 0 || gy <= 0 || gx > 2147483647 || gy > 65535) {
    std::fprintf(stderr, "invalid grid (%lld, %lld)\n", static_cast<long long>(gx),
                 static_cast<long long>(gy));
    std::abort();
  }
  BlockCtx c;
  std::barrier<> block_done(kBlock);
  std::vector<std::thread> threads;
  threads.reserve(kBlock);
  for (int t = 0; t < kBlock; ++t) {
    threads.emplace_back([&, t] {
      ctx = &c;
      thread_idx.x = static_cast<unsigned>(t);
      for (int64_t by = 0; by < gy; ++by)
        for (int64_t bx = 0; bx < gx; ++bx) {
          block_idx.x = static_cast<unsigned>(bx);
          block_idx.y = static_cast<unsigned>(by);
          kernel(args...);  // early returns skip no barrier in these kernels
          if (!pending_copies.empty() || !copy_groups.empty()) {
            std::fprintf(stderr, "cp.async copies still in flight at the end of a block\n");
            std::abort();
          }
          block_done.arrive_and_wait();
        }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace ntx_emu

#define NTX_EMULATOR 1
inline void cp_async16(void* dst, const void* src, bool valid) {
  ntx_emu::pending_copies.push_back({dst, valid ? src : nullptr});
}
inline void cp_async_commit() {
  ntx_emu::copy_groups.push_back(std::move(ntx_emu::pending_copies));
  ntx_emu::pending_copies.clear();
}
template <int N>
void cp_async_wait() {
  while (ntx_emu::copy_groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : ntx_emu::copy_groups.front()) {
      if (c.src != nullptr)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    ntx_emu::copy_groups.pop_front();
  }
}

// ---- the CUDA built-ins used by the kernels ----
#define threadIdx ntx_emu::thread_idx
#define blockIdx ntx_emu::block_idx
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __syncthreads() ntx_emu::syncthreads()
#define __syncwarp() ntx_emu::syncwarp()
template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
  return ntx_emu::shfl_xor(v, o);
}
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}
using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                      \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "CUDA_KERNEL_ASSERT failed: %s\n", #cond); \
      std::abort();                                                   \
    }                                                                 \
  } while (0)

namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane keeps the whole 16 x 16 tile (all lanes execute the same calls on the same data).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];
};

template <typename Use, typename T, typename L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (auto& row : f.x)
    for (float& e : row) e = v;
}

template <typename Use, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const P* p, unsigned ld) {
  static_assert(std::is_same_v<T, P>, "operand pointer type");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i][j] = static_cast<float>(std::is_same_v<L, col_major> ? p[j * ld + i] : p[i * ld + j]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i][j] = layout == mem_row_major ? p[i * ld + j] : p[j * ld + i];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  if (ntx_emu::thread_idx.x % 32 != 0) return;  // one writer; callers barrier before reading
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i][j];
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace nvcuda::wmma

#define __CUDA_ARCH__ 900  // after the c10 headers: only the kernels see it
#define NTX_LAUNCH(kernel, gx, gy, ...) ntx_emu::launch(kernel, (gx), (gy), __VA_ARGS__)
// An H100 / H200 (132 SMs), so that the split heuristic picks the splits the GPU would.
#define NTX_SM_COUNT() 132

#include "../nt_xent_kernels.cuh"

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

// Test hook: force the number of splits (0 = the heuristic, for 132 SMs); returns the old value.
int64_t emu_set_splits(int64_t n) {
  const int64_t old = ssl_ops::cuda_impl::split_override();
  ssl_ops::cuda_impl::split_override() = n;
  return old;
}

}  // namespace

TORCH_LIBRARY(ssl_ops_emu, m) {
  m.def(
      "nt_xent_fwd(Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx, float temperature)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "nt_xent_bwd(Tensor grad_loss, Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx,"
      " Tensor lse, Tensor inv_r, Tensor inv_c, float temperature, bool need_rows=True,"
      " bool need_cols=True) -> (Tensor, Tensor)");
  m.def("set_splits(int n) -> int", &emu_set_splits);
  m.def("host_reads_start() -> ()", &emu_host_reads_start);
  m.def("host_reads_stop() -> str[]", &emu_host_reads_stop);
}

TORCH_LIBRARY_IMPL(ssl_ops_emu, CPU, m) {
  m.impl("nt_xent_fwd", &emu_fwd);
  m.impl("nt_xent_bwd", &emu_bwd);
}
