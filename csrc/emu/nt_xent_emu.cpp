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
//   - shared memory = one buffer per launch (NTX_SMEM), filled with 0xFF bytes (NaN, -1) at the
//     start so that a read of something never written shows up in the result;
//   - __syncthreads() = ntx_emu::syncthreads(__LINE__): each barrier is known by its line in the
//     header, and set_disabled_barrier(line) removes exactly that one (all threads skip it), which
//     turns one build into every "one barrier removed" mutant.
// A missing barrier shows up as a race or a deadlock here, a wrong layout as a wrong result.
//
// Race checker (built with -DNTX_EMU_RACE=1 -fsanitize=thread, as torch.ops.ssl_ops_emu_race):
// GCC's ThreadSanitizer instrumentation turns every load and store of this translation unit into
// a call to __tsan_readN / __tsan_writeN; no TSan runtime is linked, the hooks below are ours.
// For addresses in the launch's shared memory they keep a shadow per byte: the last writer and
// the barrier interval (epoch) of its write, and the reader(s) of the current interval. Two
// accesses by different threads in one interval, at least one a write, are reported (read after
// write, write after read, write after write), whatever order the threads ran in: the check is
// by interval, not by timing. A cp.async copy is a write in every interval from its issue to the
// wait that retires it (it may land at any point in between); its data lands at the issue
// (race_mode 1) or at the wait (race_mode 2), so the two runs also see both values.
// Built on demand by tests/test_nt_xent_op.py (torch.utils.cpp_extension.load), registered as
// torch.ops.ssl_ops_emu.nt_xent_fwd / nt_xent_bwd on CPU tensors. Not part of the extension.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sched.h>

#include <atomic>
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

constexpr int kSmemBytes = 48 * 1024;  // the kernels' static shared-memory limit

struct BlockCtx {
  std::barrier<> block{kBlock};
  std::unique_ptr<std::barrier<>> warp[kBlock / kWarp];
  alignas(8) unsigned char shfl[kBlock / kWarp][kWarp][8];
  std::unique_ptr<unsigned char[]> smem_buf{new unsigned char[kSmemBytes + 128]};
  unsigned char* smem;
  BlockCtx() {
    for (auto& w : warp) w = std::make_unique<std::barrier<>>(kWarp);
    smem = smem_buf.get() + (128 - reinterpret_cast<uintptr_t>(smem_buf.get()) % 128) % 128;
    std::memset(smem, 0xFF, kSmemBytes);  // never-written shared memory reads as NaN / -1
  }
};
inline thread_local BlockCtx* ctx = nullptr;

inline unsigned char* block_smem(size_t bytes) {
  if (bytes > static_cast<size_t>(kSmemBytes)) std::abort();
  return ctx->smem;
}

// Barrier mutants and coverage: the header line of every barrier executed, and the one skipped.
constexpr int kMaxLines = 8192;
inline std::atomic<bool> barrier_seen[kMaxLines];
inline std::atomic<int> disabled_barrier{0};

// ---- race checker state (used by the NTX_EMU_RACE build) ----
namespace race {
inline std::atomic<int> mode{0};  // 0 off, 1 cp.async data lands at issue, 2 at the wait
inline unsigned char* smem_lo = nullptr;  // the running launch's shared memory
inline thread_local bool in_kernel = false;
inline thread_local int64_t epoch = 0;     // barrier intervals passed (all threads agree)
inline thread_local int last_line = 0;     // line of the last barrier this thread passed
inline int64_t next_epoch_base = 0;
#ifdef NTX_EMU_RACE
void log_access(const void* p, size_t n, bool write);
void log_in_flight();
#else
inline void log_access(const void*, size_t, bool) {}
inline void log_in_flight() {}
#endif
}  // namespace race

inline void syncthreads(int line) {
  if (line > 0 && line < kMaxLines) barrier_seen[line].store(true, std::memory_order_relaxed);
  if (line == disabled_barrier.load(std::memory_order_relaxed)) return;  // the mutant
  ctx->block.arrive_and_wait();
  ++race::epoch;
  race::last_line = line;
  race::log_in_flight();
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

// cp.async: per-thread queue of committed groups of 16-byte copies (src == nullptr: zero fill;
// landed: the data was already copied at the issue, race_mode 1).
struct AsyncCopy {
  void* dst;
  const void* src;
  bool landed;
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
  race::smem_lo = c.smem;
  const int64_t epoch0 = race::next_epoch_base;
  race::next_epoch_base += int64_t(1) << 40;  // epochs of different launches never meet
  for (int t = 0; t < kBlock; ++t) {
    threads.emplace_back([&, t] {
      ctx = &c;
      race::in_kernel = true;
      race::epoch = epoch0;
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
          ++race::epoch;  // the next block starts a new interval
          race::last_line = 0;
        }
    });
  }
  for (auto& th : threads) th.join();
  race::smem_lo = nullptr;
}

}  // namespace ntx_emu

namespace ntx_emu {
inline void land(const AsyncCopy& c) {
  if (c.src != nullptr)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}
}  // namespace ntx_emu

#define NTX_EMULATOR 1
inline void cp_async16(void* dst, const void* src, bool valid) {
  ntx_emu::AsyncCopy c{dst, valid ? src : nullptr, false};
  ntx_emu::race::log_access(dst, 16, true);  // in flight from here ...
  if (ntx_emu::race::mode.load(std::memory_order_relaxed) == 1) {
    ntx_emu::land(c);
    c.landed = true;
  }
  ntx_emu::pending_copies.push_back(c);
}
inline void cp_async_commit() {
  ntx_emu::copy_groups.push_back(std::move(ntx_emu::pending_copies));
  ntx_emu::pending_copies.clear();
}
template <int N>
void cp_async_wait() {
  while (ntx_emu::copy_groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : ntx_emu::copy_groups.front()) {
      if (!c.landed) ntx_emu::land(c);
      ntx_emu::race::log_access(c.dst, 16, true);  // ... to its wait
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
#define NTX_SMEM(name, bytes) unsigned char* name = ntx_emu::block_smem(bytes)
#define __syncthreads() ntx_emu::syncthreads(__LINE__)
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
// The __launch_bounds__ promise of the tile kernels (what sm_90 fits, bench/RESULTS.md).
#define NTX_RESIDENT_BLOCKS(kernel) ssl_ops::cuda_impl::kMinBlocks

#include "../nt_xent_kernels.cuh"

static_assert(ssl_ops::cuda_impl::kThreads == ntx_emu::kBlock, "block size");

namespace ntx_emu::race {
#ifdef NTX_EMU_RACE
#define NTX_NO_TSAN __attribute__((no_sanitize_thread, noinline))
// Shadow of one byte of shared memory. Only touched under the byte's stripe lock.
struct Shadow {
  int64_t w_epoch, r_epoch;
  int16_t w_thread, r_thread;  // r_thread = kMany: two or more threads read in r_epoch
};
constexpr int16_t kMany = -2;
Shadow shadow[kSmemBytes];
bool shadow_ready = false;
constexpr int kStripes = 64;
int stripe_lock[kStripes];
struct Report {
  char kind[4];
  int offset, t_now, t_other, line;
};
constexpr int kMaxReports = 64;
Report reports[kMaxReports];
int n_reports = 0;      // under report_lock
int64_t n_races = 0;    // all races, reported or not
int report_lock = 0;

NTX_NO_TSAN void lock(int* l) {
  while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) sched_yield();
}
NTX_NO_TSAN void unlock(int* l) {
  __atomic_store_n(l, 0, __ATOMIC_RELEASE);
}
NTX_NO_TSAN void report(const char* kind, int offset, int t_now, int t_other) {
  lock(&report_lock);
  ++n_races;
  if (n_reports < kMaxReports) {
    Report& r = reports[n_reports++];
    r.kind[0] = kind[0];
    r.kind[1] = kind[1];
    r.kind[2] = kind[2];
    r.kind[3] = 0;
    r.offset = offset;
    r.t_now = t_now;
    r.t_other = t_other;
    r.line = last_line;
  }
  unlock(&report_lock);
}

NTX_NO_TSAN void log_access(const void* p, size_t n, bool write) {
  unsigned char* lo = smem_lo;
  const auto* b = static_cast<const unsigned char*>(p);
  if (lo == nullptr || b + n <= lo || b >= lo + kSmemBytes || !in_kernel) return;
  if (mode.load(std::memory_order_relaxed) == 0) return;
  const int t = static_cast<int>(thread_idx.x);
  const int64_t e = epoch;
  int o0 = static_cast<int>(b - lo), o1 = o0 + static_cast<int>(n);
  if (o0 < 0) o0 = 0;
  if (o1 > kSmemBytes) o1 = kSmemBytes;
  for (int o = o0; o < o1;) {
    const int stripe_end = (o / 64 + 1) * 64 < o1 ? (o / 64 + 1) * 64 : o1;
    int* l = &stripe_lock[(o / 64) % kStripes];
    lock(l);
    for (; o < stripe_end; ++o) {
      Shadow& s = shadow[o];
      if (write) {
        if (s.w_epoch == e && s.w_thread != t) report("WAW", o, t, s.w_thread);
        else if (s.r_epoch == e && s.r_thread != t) report("WAR", o, t, s.r_thread);
        s.w_epoch = e;
        s.w_thread = static_cast<int16_t>(t);
      } else {
        if (s.w_epoch == e && s.w_thread != t) report("RAW", o, t, s.w_thread);
        if (s.r_epoch != e) {
          s.r_epoch = e;
          s.r_thread = static_cast<int16_t>(t);
        } else if (s.r_thread != t) {
          s.r_thread = kMany;
        }
      }
    }
    unlock(l);
  }
}

// After a barrier: every cp.async copy still in flight may land in this new interval too.
NTX_NO_TSAN void log_in_flight() {
  if (mode.load(std::memory_order_relaxed) == 0) return;
  for (const auto& c : pending_copies) log_access(c.dst, 16, true);
  for (const auto& g : copy_groups)
    for (const auto& c : g) log_access(c.dst, 16, true);
}

void reset_shadow() {
  for (auto& s : shadow) s = Shadow{-1, -1, -1, -1};
  n_reports = 0;
  n_races = 0;
}
#endif
}  // namespace ntx_emu::race

#ifdef NTX_EMU_RACE
// The ThreadSanitizer instrumentation's entry points (no TSan runtime is linked): plain loads
// and stores go to the shadow check, atomics are performed as such.
extern "C" {
#define NTX_RW(n)                                                        \
  NTX_NO_TSAN void __tsan_read##n(void* p) {                             \
    ntx_emu::race::log_access(p, n, false);                              \
  }                                                                      \
  NTX_NO_TSAN void __tsan_write##n(void* p) {                            \
    ntx_emu::race::log_access(p, n, true);                               \
  }                                                                      \
  NTX_NO_TSAN void __tsan_unaligned_read##n(void* p) {                   \
    ntx_emu::race::log_access(p, n, false);                              \
  }                                                                      \
  NTX_NO_TSAN void __tsan_unaligned_write##n(void* p) {                  \
    ntx_emu::race::log_access(p, n, true);                               \
  }                                                                      \
  NTX_NO_TSAN void __tsan_volatile_read##n(void* p) {                    \
    ntx_emu::race::log_access(p, n, false);                              \
  }                                                                      \
  NTX_NO_TSAN void __tsan_volatile_write##n(void* p) {                   \
    ntx_emu::race::log_access(p, n, true);                               \
  }
NTX_RW(1)
NTX_RW(2)
NTX_RW(4)
NTX_RW(8)
NTX_RW(16)
NTX_NO_TSAN void __tsan_read_range(void* p, unsigned long n) {
  ntx_emu::race::log_access(p, n, false);
}
NTX_NO_TSAN void __tsan_write_range(void* p, unsigned long n) {
  ntx_emu::race::log_access(p, n, true);
}
NTX_NO_TSAN void __tsan_init() {}
NTX_NO_TSAN void __tsan_func_entry(void*) {}
NTX_NO_TSAN void __tsan_func_exit() {}
NTX_NO_TSAN void __tsan_vptr_update(void** p, void* v) {
  *p = v;
}
NTX_NO_TSAN void __tsan_vptr_read(void**) {}
NTX_NO_TSAN void __tsan_atomic_thread_fence(int) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
NTX_NO_TSAN void __tsan_atomic_signal_fence(int) {
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}
#define NTX_ATOMIC(n, T)                                                                      \
  NTX_NO_TSAN T __tsan_atomic##n##_load(const volatile T* a, int) {                          \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                             \
  }                                                                                           \
  NTX_NO_TSAN void __tsan_atomic##n##_store(volatile T* a, T v, int) {                       \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_exchange(volatile T* a, T v, int) {                       \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) {                      \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) {                      \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) {                      \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) {                       \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) {                      \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_fetch_nand(volatile T* a, T v, int) {                     \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                           \
  NTX_NO_TSAN int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int,  \
                                                             int) {                           \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
  }                                                                                           \
  NTX_NO_TSAN int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int,    \
                                                           int) {                             \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
  }                                                                                           \
  NTX_NO_TSAN T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) { \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);         \
    return c;                                                                                 \
  }
NTX_ATOMIC(8, unsigned char)
NTX_ATOMIC(16, unsigned short)
NTX_ATOMIC(32, unsigned int)
NTX_ATOMIC(64, unsigned long long)
}  // extern "C"
#endif

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

// Barrier mutants: skip the __syncthreads() on this header line (0: none); returns the old one.
int64_t emu_set_disabled_barrier(int64_t line) {
  return ntx_emu::disabled_barrier.exchange(static_cast<int>(line));
}

// Header lines of the barriers executed since the last call (then forgotten).
std::vector<int64_t> emu_barrier_lines() {
  std::vector<int64_t> out;
  for (int l = 0; l < ntx_emu::kMaxLines; ++l)
    if (ntx_emu::barrier_seen[l].exchange(false)) out.push_back(l);
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
// reports "KIND at shared byte OFFSET: thread A vs thread B, after the barrier at line L".
std::vector<std::string> emu_races() {
  std::vector<std::string> out{std::to_string(ntx_emu::race::n_races)};
  for (int i = 0; i < ntx_emu::race::n_reports; ++i) {
    const auto& r = ntx_emu::race::reports[i];
    out.push_back(std::string(r.kind) + " at shared byte " + std::to_string(r.offset) +
                  ": thread " + std::to_string(r.t_now) + " vs thread " +
                  std::to_string(r.t_other) + ", after the barrier at line " +
                  std::to_string(r.line));
  }
  return out;
}
#endif

// Test hook: force the number of splits (0 = the heuristic, for 132 SMs); returns the old value.
int64_t emu_set_splits(int64_t n) {
  const int64_t old = ssl_ops::cuda_impl::split_override();
  ssl_ops::cuda_impl::split_override() = n;
  return old;
}

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
  m.def(
      "nt_xent_fwd(Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx, float temperature)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "nt_xent_bwd(Tensor grad_loss, Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx,"
      " Tensor lse, Tensor inv_r, Tensor inv_c, float temperature, bool need_rows=True,"
      " bool need_cols=True) -> (Tensor, Tensor)");
  m.def(
      "nt_xent_tiled_fwd(Tensor rows, Tensor cols, Tensor pos_idx, Tensor self_idx,"
      " float temperature, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "nt_xent_tiled_bwd(Tensor grad_loss, Tensor rows, Tensor cols, Tensor pos_idx,"
      " Tensor self_idx, Tensor lse, Tensor inv_r, Tensor inv_c, float temperature, int chunk,"
      " bool need_rows=True, bool need_cols=True) -> (Tensor, Tensor)");
  m.def("set_splits(int n) -> int", &emu_set_splits);
  m.def("host_reads_start() -> ()", &emu_host_reads_start);
  m.def("host_reads_stop() -> str[]", &emu_host_reads_stop);
  m.def("set_disabled_barrier(int line) -> int", &emu_set_disabled_barrier);
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
