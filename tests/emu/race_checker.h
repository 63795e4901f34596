// The race checker of the test-only emulator (the NTX_EMU_RACE build, see nt_xent_emu.cpp):
// a shadow per byte of the launch's shared memory, fed by GCC's ThreadSanitizer instrumentation
// (-fsanitize=thread) through the __tsan_* entry points defined here (no TSan runtime is linked).
// Included by nt_xent_emu.cpp after cuda_emu.h; empty in the plain build.
#pragma once

#include <sched.h>

#include <cstdint>

#include "cuda_emu.h"

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
  int offset, t_now, t_other, barrier;
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
    r.barrier = last_barrier;
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
