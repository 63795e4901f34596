// The emulated CUDA of the test-only GPU-kernel emulator (nt_xent_emu.cpp): a block of 128
// std::threads, __syncthreads as a std::barrier (each barrier known by its header and line, so
// that one can be removed), warp shuffles, deferred cp.async copies, an emulated WMMA, the CUDA
// built-ins as macros and the NTX_* hooks csrc/cuda/launch.cuh expects. Included once, by
// nt_xent_emu.cpp, before the kernels; the race checker's state is declared here and its
// shadow memory lives in race_checker.h.
#pragma once

// Everything the kernels, their launchers and race_checker.h include comes first, before the
// macros below (__global__, __shared__, threadIdx, ...) exist.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
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

// Barriers are known by an id: 10000 x the number of their header in kBarrierHeaders (from 1)
// plus their line there (tests/test_nt_xent_emu.py numbers them the same way). A __syncthreads()
// in any other file does not compile (checked_barrier_id), so no barrier escapes the mutants.
inline constexpr const char* kBarrierHeaders[] = {"fused_tiles.cuh", "fused_kernels.cuh"};
constexpr int kIdsPerHeader = 10000;
constexpr int kNumHeaders = static_cast<int>(std::size(kBarrierHeaders));
constexpr int kMaxBarrierIds = kIdsPerHeader * (kNumHeaders + 1);

// The id of the barrier on `line` of `file` (a path ending in /<header>), 0 when the file is none
// of kBarrierHeaders.
constexpr int barrier_id(std::string_view file, int line) {
  for (int h = 0; h < kNumHeaders; ++h) {
    const std::string_view name = kBarrierHeaders[h];
    if (file.size() > name.size() && file.substr(file.size() - name.size()) == name &&
        file[file.size() - name.size() - 1] == '/')
      return (h + 1) * kIdsPerHeader + line;
  }
  return 0;
}
template <int Id>
constexpr int checked_barrier_id() {
  static_assert(Id > 0, "__syncthreads() outside the headers of kBarrierHeaders: add its header "
                        "there and to BARRIER_HEADERS in tests/test_nt_xent_emu.py");
  static_assert(Id % kIdsPerHeader != 0 && Id < kMaxBarrierIds, "header line out of range");
  return Id;
}
// "fused_tiles.cuh:319" for a barrier id ("the block's start" for 0).
inline std::string barrier_name(int id) {
  if (id <= 0 || id >= kMaxBarrierIds) return "the block's start";
  return std::string(kBarrierHeaders[id / kIdsPerHeader - 1]) + ":" +
         std::to_string(id % kIdsPerHeader);
}

// Barrier mutants and coverage: every barrier executed, and the one skipped.
inline std::atomic<bool> barrier_seen[kMaxBarrierIds];
inline std::atomic<int> disabled_barrier{0};

// ---- race checker state (used by the NTX_EMU_RACE build) ----
namespace race {
inline std::atomic<int> mode{0};  // 0 off, 1 cp.async data lands at issue, 2 at the wait
inline unsigned char* smem_lo = nullptr;  // the running launch's shared memory
inline thread_local bool in_kernel = false;
inline thread_local int64_t epoch = 0;     // barrier intervals passed (all threads agree)
inline thread_local int last_barrier = 0;  // id of the last barrier this thread passed
inline int64_t next_epoch_base = 0;
#ifdef NTX_EMU_RACE
void log_access(const void* p, size_t n, bool write);
void log_in_flight();
#else
inline void log_access(const void*, size_t, bool) {}
inline void log_in_flight() {}
#endif
}  // namespace race

inline void syncthreads(int id) {
  barrier_seen[id].store(true, std::memory_order_relaxed);
  if (id == disabled_barrier.load(std::memory_order_relaxed)) return;  // the mutant
  ctx->block.arrive_and_wait();
  ++race::epoch;
  race::last_barrier = id;
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
          race::last_barrier = 0;
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
#define __syncthreads() \
  ntx_emu::syncthreads(ntx_emu::checked_barrier_id<ntx_emu::barrier_id(__FILE__, __LINE__)>())
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
