// CPU kernels of the NT-Xent op: the fused CPU kernels (nt_xent_fwd / nt_xent_bwd) and the tiled
// path's CPU elementwise loops (nt_xent_tiled_fwd / _bwd, host algorithm in nt_xent_tiled.h),
// registered as TORCH_LIBRARY_IMPL(ssl_ops, CPU) (schemas: nt_xent.h, define_ops).
//
// CPU algorithm (never an R x C buffer; each worker owns one [BR, BC] tile buffer):
//   forward : per row tile (parallel), stream column tiles: S = rows_t @ cols_t^T (BLAS on tile
//             views), scale to logits, mask the self column with -inf, online log-sum-exp.
//   backward: pass 1, per row tile (parallel), stream column tiles: recompute the tile,
//             G = (softmax - onehot(pos)) * inv_c, A += G @ cols_t  -> grad_rows.
//             pass 2, per column tile (parallel), stream row tiles: recompute the transposed tile,
//             G^T = (softmax - onehot(pos))^T * g * inv_r, B += G^T @ rows_t -> grad_cols.
//   Every output element is written by exactly one worker in a fixed order: deterministic and
//   independent of the thread count, with no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "nt_xent.h"
#include "nt_xent_tile.h"
#include "nt_xent_tiled.h"

namespace ssl_ops {

using at::Tensor;

namespace {

// Tile sizes: a [128, 512] fp32 logit tile is 256 KiB (fits L2); BLAS is near peak at this size.
constexpr int64_t kBR = 128;
constexpr int64_t kBC = 512;

template <typename acc_t>
Tensor blob(const acc_t* p, at::IntArrayRef sizes) {
  // A tensor view of an existing buffer (no allocation, no autograd history).
  return at::from_blob(const_cast<acc_t*>(p), sizes,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t>
void inv_norms(const acc_t* x, int64_t n, int64_t d, acc_t* inv) {
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const acc_t* xi = x + i * d;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < d; ++k) ss += xi[k] * xi[k];
      inv[i] = ntx::inv_norm(ss);
    }
  });
}

// The elementwise tile passes below are the CPU's hot loops next to BLAS. They are compiled
// several times (AVX-512, AVX2+FMA, baseline SSE2) and picked at load time by the CPU's
// features (GCC/Clang function multi-versioning), so one binary is portable and still wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NTX_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define NTX_CLONES
#endif

// s[b] = s[b] * scale * w[b]  (raw dot products -> logits)
template <typename acc_t>
inline void scale_row(acc_t* s, int64_t n, acc_t scale, const acc_t* w) {
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) s[b] = s[b] * (scale * w[b]);
}

template <typename acc_t>
inline acc_t row_max(const acc_t* s, int64_t n) {
  acc_t m = ntx::neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t b = 0; b < n; ++b) m = s[b] > m ? s[b] : m;
  return m;
}

template <typename acc_t>
inline acc_t row_sum_exp(const acc_t* s, int64_t n, acc_t shift) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t b = 0; b < n; ++b) sum += ntx::fast_exp(s[b] - shift);
  return sum;
}

// Forward, one [nr, nc] tile of raw dot products s (rows i0.., cols j0..): logits, self mask,
// positive logit, and the online log-sum-exp update of each row's state.
template <typename acc_t>
inline void fwd_tile(acc_t* s, int64_t nr, int64_t nc, int64_t i0, int64_t j0,
                       const acc_t* inv_r, const acc_t* inv_c, acc_t inv_t, const int64_t* self,
                       const int64_t* pos, ntx::LseState<acc_t>* st, acc_t* pl) {
  for (int64_t a = 0; a < nr; ++a) {
    const int64_t i = i0 + a;
    acc_t* sa = s + a * nc;
    scale_row(sa, nc, inv_r[i] * inv_t, inv_c + j0);
    const int64_t sj = self[i] - j0, pj = pos[i] - j0;
    if (sj >= 0 && sj < nc) sa[sj] = ntx::neg_inf<acc_t>();  // -inf: exactly zero weight
    if (pj >= 0 && pj < nc) pl[a] = sa[pj];  // read after the mask: pos == self gives inf loss
    const acc_t tm = row_max(sa, nc);
    const acc_t ts = tm == ntx::neg_inf<acc_t>() ? acc_t(0) : row_sum_exp(sa, nc, tm);
    st[a] = ntx::lse_merge(st[a], ntx::LseState<acc_t>{tm, ts});
  }
}

// Backward pass 1, one [nr, nc] tile: s <- (softmax - onehot(pos)) * inv_c[j].
template <typename acc_t>
inline void bwd_rows_tile(acc_t* s, int64_t nr, int64_t nc, int64_t i0, int64_t j0,
                            const acc_t* inv_r, const acc_t* inv_c, acc_t inv_t,
                            const int64_t* self, const int64_t* pos, const acc_t* lse) {
  const acc_t* w = inv_c + j0;
  for (int64_t a = 0; a < nr; ++a) {
    const int64_t i = i0 + a;
    acc_t* sa = s + a * nc;
    scale_row(sa, nc, inv_r[i] * inv_t, w);
    const int64_t sj = self[i] - j0, pj = pos[i] - j0;
    if (sj >= 0 && sj < nc) sa[sj] = ntx::neg_inf<acc_t>();
    const acc_t li = lse[i];
#pragma omp simd
    for (int64_t b = 0; b < nc; ++b)
      sa[b] = ntx::softmax_minus_onehot(sa[b], li, false, false) * w[b];
    if (pj >= 0 && pj < nc) sa[pj] -= w[pj];  // the onehot(pos) term
  }
}

// Backward pass 2, one transposed [nc, nr] tile (s[b][a] for col j0 + b, row i0 + a):
// s <- (softmax - onehot(pos))^T * gw[i], gw = g * inv_r.
template <typename acc_t>
inline void bwd_cols_tile(acc_t* s, int64_t nc, int64_t nr, int64_t i0, int64_t j0,
                            const acc_t* inv_r, const acc_t* inv_c, acc_t inv_t,
                            const int64_t* self, const int64_t* pos, const acc_t* lse,
                            const acc_t* gw) {
  for (int64_t b = 0; b < nc; ++b) scale_row(s + b * nr, nr, inv_c[j0 + b] * inv_t, inv_r + i0);
  for (int64_t a = 0; a < nr; ++a) {
    const int64_t sj = self[i0 + a] - j0;
    if (sj >= 0 && sj < nc) s[sj * nr + a] = ntx::neg_inf<acc_t>();
  }
  const acc_t* li = lse + i0;
  const acc_t* w = gw + i0;
  for (int64_t b = 0; b < nc; ++b) {
    acc_t* sb = s + b * nr;
#pragma omp simd
    for (int64_t a = 0; a < nr; ++a)
      sb[a] = ntx::softmax_minus_onehot(sb[a], li[a], false, false) * w[a];
  }
  for (int64_t a = 0; a < nr; ++a) {
    const int64_t pj = pos[i0 + a] - j0;
    if (pj >= 0 && pj < nc) s[pj * nr + a] -= w[a];
  }
}

// fp32 entry points, multi-versioned: for float arguments overload resolution prefers these to
// the templates above, which fp64 (gradcheck only) calls directly.
NTX_CLONES void fwd_tile(float* s, int64_t nr, int64_t nc, int64_t i0, int64_t j0,
                         const float* inv_r, const float* inv_c, float inv_t,
                         const int64_t* self, const int64_t* pos, ntx::LseState<float>* st,
                         float* pl) {
  fwd_tile<float>(s, nr, nc, i0, j0, inv_r, inv_c, inv_t, self, pos, st, pl);
}
NTX_CLONES void bwd_rows_tile(float* s, int64_t nr, int64_t nc, int64_t i0, int64_t j0,
                              const float* inv_r, const float* inv_c, float inv_t,
                              const int64_t* self, const int64_t* pos, const float* lse) {
  bwd_rows_tile<float>(s, nr, nc, i0, j0, inv_r, inv_c, inv_t, self, pos, lse);
}
NTX_CLONES void bwd_cols_tile(float* s, int64_t nc, int64_t nr, int64_t i0, int64_t j0,
                              const float* inv_r, const float* inv_c, float inv_t,
                              const int64_t* self, const int64_t* pos, const float* lse,
                              const float* gw) {
  bwd_cols_tile<float>(s, nc, nr, i0, j0, inv_r, inv_c, inv_t, self, pos, lse, gw);
}

// Index checks up front: the kernels index cols with pos/self without further checks.
void check_index_range(const Tensor& idx, int64_t C, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < C, "nt_xent: ", name, "[", i, "] = ", p[i],
                " is out of range for ", C, " columns");
}

template <typename acc_t>
void fwd_impl(const acc_t* r, const acc_t* c, const int64_t* pos, const int64_t* self,
              int64_t R, int64_t C, int64_t d, acc_t inv_t, acc_t* inv_r, acc_t* inv_c,
              acc_t* loss, acc_t* lse) {
  inv_norms(r, R, d, inv_r);
  inv_norms(c, C, d, inv_c);
  const int64_t n_tiles = (R + kBR - 1) / kBR;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard;  // the tile products below need no autograd bookkeeping
    std::vector<acc_t> sbuf(kBR * kBC);                          // [BR, BC] logit tile
    std::vector<ntx::LseState<acc_t>> st(kBR);                   // running (max, sum) per row
    std::vector<acc_t> pl(kBR);                                  // positive logit per row
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kBR, nr = std::min(kBR, R - i0);
      const Tensor rt = blob(r + i0 * d, {nr, d});
      std::fill(st.begin(), st.end(), ntx::LseState<acc_t>{ntx::neg_inf<acc_t>(), acc_t(0)});
      std::fill(pl.begin(), pl.end(), ntx::neg_inf<acc_t>());
      for (int64_t j0 = 0; j0 < C; j0 += kBC) {
        const int64_t nc = std::min(kBC, C - j0);
        Tensor s = blob(sbuf.data(), {nr, nc});
        at::mm_out(s, rt, blob(c + j0 * d, {nc, d}).t());  // [nr, nc] raw dot products
        fwd_tile(sbuf.data(), nr, nc, i0, j0, inv_r, inv_c, inv_t, self, pos, st.data(), pl.data());
      }
      for (int64_t a = 0; a < nr; ++a) {
        const acc_t v = ntx::lse_finish(st[a]);
        lse[i0 + a] = v;
        loss[i0 + a] = v - pl[a];
      }
    }
  });
}

// grad_x[i] = normalize_backward(scale_i * acc[i], x[i] * inv[i]) for one row of length d.
template <typename acc_t>
inline void finalize_row(const acc_t* acc, acc_t scale, const acc_t* x, acc_t inv, int64_t d,
                         acc_t* out) {
  acc_t dot = 0, ss = 0;
#pragma omp simd reduction(+ : dot, ss)
  for (int64_t k = 0; k < d; ++k) {
    dot += acc[k] * scale * (x[k] * inv);
    ss += x[k] * x[k];
  }
  const bool clamped = ntx::norm_clamped(ss);
#pragma omp simd
  for (int64_t k = 0; k < d; ++k)
    out[k] = ntx::normalize_backward(acc[k] * scale, x[k] * inv, dot, inv, clamped);
}

template <typename acc_t>
void bwd_impl(const acc_t* g, const acc_t* r, const acc_t* c, const int64_t* pos,
              const int64_t* self, const acc_t* lse, const acc_t* inv_r, const acc_t* inv_c,
              int64_t R, int64_t C, int64_t d, acc_t inv_t, acc_t* grad_r, acc_t* grad_c) {
  // A null output skips its pass (the input needs no gradient).
  // Pass 1: grad_rows. grad_rhat_i = g_i / T * sum_j (p_ij - [j == pos_i]) * chat_j, with
  // chat_j = cols_j * inv_c[j]: the inv_c factor is folded into the tile before the product.
  const int64_t n_rt = grad_r != nullptr ? (R + kBR - 1) / kBR : 0;
  if (n_rt > 0) at::parallel_for(0, n_rt, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard;
    std::vector<acc_t> sbuf(kBR * kBC), abuf(kBR * d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kBR, nr = std::min(kBR, R - i0);
      const Tensor rt = blob(r + i0 * d, {nr, d});
      Tensor acc = blob(abuf.data(), {nr, d});
      acc.zero_();
      for (int64_t j0 = 0; j0 < C; j0 += kBC) {
        const int64_t nc = std::min(kBC, C - j0);
        const Tensor ct = blob(c + j0 * d, {nc, d});
        Tensor s = blob(sbuf.data(), {nr, nc});
        at::mm_out(s, rt, ct.t());
        bwd_rows_tile(sbuf.data(), nr, nc, i0, j0, inv_r, inv_c, inv_t, self, pos, lse);
        acc.addmm_(s, ct);  // [nr, d] += [nr, nc] @ [nc, d]
      }
      for (int64_t a = 0; a < nr; ++a) {
        const int64_t i = i0 + a;
        finalize_row(abuf.data() + a * d, g[i] * inv_t, r + i * d, inv_r[i], d, grad_r + i * d);
      }
    }
  });

  // Pass 2: grad_cols. grad_chat_j = 1 / T * sum_i g_i (p_ij - [j == pos_i]) * rhat_i: stream
  // row tiles against a fixed column tile, the transposed tile is [BC, BR].
  if (grad_c == nullptr) return;
  std::vector<acc_t> gw(R);  // g_i * inv_r[i], the row-side weight of each G^T column
  for (int64_t i = 0; i < R; ++i) gw[i] = g[i] * inv_r[i];
  const int64_t n_ct = (C + kBC - 1) / kBC;
  at::parallel_for(0, n_ct, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard;
    std::vector<acc_t> sbuf(kBC * kBR), bbuf(kBC * d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kBC, nc = std::min(kBC, C - j0);
      const Tensor ct = blob(c + j0 * d, {nc, d});
      Tensor acc = blob(bbuf.data(), {nc, d});
      acc.zero_();
      for (int64_t i0 = 0; i0 < R; i0 += kBR) {
        const int64_t nr = std::min(kBR, R - i0);
        const Tensor rt = blob(r + i0 * d, {nr, d});
        Tensor s = blob(sbuf.data(), {nc, nr});  // s[b][a] = logit(i0 + a, j0 + b)
        at::mm_out(s, ct, rt.t());
        bwd_cols_tile(sbuf.data(), nc, nr, i0, j0, inv_r, inv_c, inv_t, self, pos, lse,
                      gw.data());
        acc.addmm_(s, rt);  // [nc, d] += [nc, nr] @ [nr, d]
      }
      for (int64_t b = 0; b < nc; ++b) {
        const int64_t j = j0 + b;
        finalize_row(bbuf.data() + b * d, inv_t, c + j * d, inv_c[j], d, grad_c + j * d);
      }
    }
  });
}

// g[k] = softmax(logit_k) * gs for one row of a chunk, logit_k = s[k] ri ic[k] (no self / pos
// handling: the caller fixes those two entries).
template <typename acc_t>
inline void tiled_g_row(const acc_t* s, const acc_t* ic, acc_t ri, acc_t lse, acc_t gs, int64_t nc,
                        acc_t* g) {
#pragma omp simd
  for (int64_t k = 0; k < nc; ++k)
    g[k] = ntx::softmax_minus_onehot(s[k] * (ri * ic[k]), lse, false, false) * gs;
}

// ---- the tiled path's CPU elementwise kernels (nt_xent_tiled.h: the GEMMs are at::mm) ----
struct CpuTiledEW {
  // bf16/fp16 are computed from an fp32 copy (as the fused CPU kernels).
  Tensor gemm_input(const Tensor& x) const {
    return x.to(acc_type_of(x.scalar_type())).contiguous();
  }
  void check_indices(const Tensor& pos, const Tensor& self, int64_t C) const {
    check_index_range(pos, C, "pos_idx");  // host memory: no sync to avoid on the CPU
    check_index_range(self, C, "self_idx");
  }
  // The fused CPU kernels' tile update (fwd_tile), on row blocks of the [R, nc] chunk.
  void fwd_chunk(const Tensor& S, int64_t j0, const Tensor& inv_r, const Tensor& inv_c,
                 double inv_t, const Tensor& self, const Tensor& pos, Tensor& m, Tensor& l,
                 Tensor& pl) const {
    const int64_t R = S.size(0), nc = S.size(1);
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "nt_xent_tiled_fwd_chunk_cpu", [&] {
      scalar_t* s = S.data_ptr<scalar_t>();  // a temporary of the caller: scaled in place
      scalar_t* pm = m.data_ptr<scalar_t>();
      scalar_t* pls = l.data_ptr<scalar_t>();
      scalar_t* ppl = pl.data_ptr<scalar_t>();
      const scalar_t* ir = inv_r.data_ptr<scalar_t>();
      const scalar_t* ic = inv_c.data_ptr<scalar_t>();
      const int64_t* ps = self.data_ptr<int64_t>();
      const int64_t* pp = pos.data_ptr<int64_t>();
      at::parallel_for(0, R, 64, [&](int64_t b, int64_t e) {
        std::vector<ntx::LseState<scalar_t>> st(e - b);
        for (int64_t i = b; i < e; ++i) st[i - b] = {pm[i], pls[i]};
        fwd_tile(s + b * nc, e - b, nc, b, j0, ir, ic, scalar_t(inv_t), ps, pp, st.data(),
                 ppl + b);
        for (int64_t i = b; i < e; ++i) {
          pm[i] = st[i - b].m;
          pls[i] = st[i - b].l;
        }
      });
    });
  }
  void bwd_chunk(const Tensor& S, Tensor& G, int64_t j0, const Tensor& inv_r,
                 const Tensor& inv_c, double inv_t, const Tensor& self, const Tensor& pos,
                 const Tensor& lse, double gscale) const {
    const int64_t R = S.size(0), nc = S.size(1);
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "nt_xent_tiled_bwd_chunk_cpu", [&] {
      const scalar_t* s = S.data_ptr<scalar_t>();
      scalar_t* g = G.data_ptr<scalar_t>();  // G is in acc_t on the CPU (fp32 copies)
      const scalar_t* ir = inv_r.data_ptr<scalar_t>();
      const scalar_t* ic = inv_c.data_ptr<scalar_t>() + j0;
      const scalar_t* li = lse.data_ptr<scalar_t>();
      const int64_t* ps = self.data_ptr<int64_t>();
      const int64_t* pp = pos.data_ptr<int64_t>();
      const scalar_t gs = scalar_t(gscale);
      at::parallel_for(0, R, 64, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          scalar_t* gi = g + i * nc;
          tiled_g_row(s + i * nc, ic, ir[i] * scalar_t(inv_t), li[i], gs, nc, gi);
          const int64_t sj = ps[i] - j0, pj = pp[i] - j0;
          if (sj >= 0 && sj < nc) gi[sj] = 0;  // the self column: exactly zero
          if (pj >= 0 && pj < nc) gi[pj] -= gs;  // the onehot(pos) term
        }
      });
    });
  }
};

}  // namespace

// Returns (loss [R], lse [R], inv_r [R], inv_c [C]), all in the accumulation dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor> nt_xent_fwd_cpu(const Tensor& rows, const Tensor& cols,
                                                           const Tensor& pos_idx,
                                                           const Tensor& self_idx,
                                                           double temperature) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  const auto acc_type = acc_type_of(rows.scalar_type());
  // bf16/fp16 are computed from an fp32 copy of the inputs: O((R + C) d) extra memory.
  const Tensor r = rows.to(acc_type).contiguous();
  const Tensor c = cols.to(acc_type).contiguous();
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  check_index_range(pos, C, "pos_idx");
  check_index_range(self, C, "self_idx");
  auto opts = r.options();
  Tensor loss = at::empty({R}, opts), lse = at::empty({R}, opts);
  Tensor inv_r = at::empty({R}, opts), inv_c = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "nt_xent_fwd_cpu", [&] {
    fwd_impl<scalar_t>(r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
                       self.data_ptr<int64_t>(), R, C, d, scalar_t(1.0 / temperature),
                       inv_r.data_ptr<scalar_t>(), inv_c.data_ptr<scalar_t>(),
                       loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {loss, lse, inv_r, inv_c};
}

// Returns (grad_rows [R, d], grad_cols [C, d]) in the dtype of rows/cols.
std::tuple<Tensor, Tensor> nt_xent_bwd_cpu(const Tensor& grad_loss, const Tensor& rows,
                                           const Tensor& cols, const Tensor& pos_idx,
                                           const Tensor& self_idx, const Tensor& lse,
                                           const Tensor& inv_r, const Tensor& inv_c,
                                           double temperature, bool need_rows, bool need_cols) {
  check_inputs(rows, cols, pos_idx, self_idx, temperature);
  check_bwd_inputs(grad_loss, rows, cols, lse, inv_r, inv_c);
  const auto acc_type = acc_type_of(rows.scalar_type());
  const Tensor r = rows.to(acc_type).contiguous();
  const Tensor c = cols.to(acc_type).contiguous();
  // The incoming gradient is used as given (mean() makes it a stride-0 expand: materialise).
  const Tensor g = grad_loss.to(acc_type).contiguous();
  const Tensor pos = pos_idx.contiguous(), self = self_idx.contiguous();
  const Tensor l = lse.contiguous(), ir = inv_r.contiguous(), ic = inv_c.contiguous();
  const int64_t R = r.size(0), C = c.size(0), d = r.size(1);
  check_index_range(pos, C, "pos_idx");
  check_index_range(self, C, "self_idx");
  Tensor gr = at::empty({need_rows ? R : 0, d}, r.options());
  Tensor gc = at::empty({need_cols ? C : 0, d}, r.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "nt_xent_bwd_cpu", [&] {
    bwd_impl<scalar_t>(g.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                       pos.data_ptr<int64_t>(), self.data_ptr<int64_t>(), l.data_ptr<scalar_t>(),
                       ir.data_ptr<scalar_t>(), ic.data_ptr<scalar_t>(), R, C, d,
                       scalar_t(1.0 / temperature), need_rows ? gr.data_ptr<scalar_t>() : nullptr,
                       need_cols ? gc.data_ptr<scalar_t>() : nullptr);
  });
  return {gr.to(rows.scalar_type()), gc.to(cols.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nt_xent_tiled_fwd_cpu(const Tensor& rows,
                                                                 const Tensor& cols,
                                                                 const Tensor& pos_idx,
                                                                 const Tensor& self_idx,
                                                                 double temperature,
                                                                 int64_t chunk) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // inner ATen ops: no graph
  return tiled::fwd(CpuTiledEW{}, rows, cols, pos_idx, self_idx, temperature, chunk);
}

std::tuple<Tensor, Tensor> nt_xent_tiled_bwd_cpu(const Tensor& grad_loss, const Tensor& rows,
                                                 const Tensor& cols, const Tensor& pos_idx,
                                                 const Tensor& self_idx, const Tensor& lse,
                                                 const Tensor& inv_r, const Tensor& inv_c,
                                                 double temperature, int64_t chunk,
                                                 bool need_rows, bool need_cols) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  return tiled::bwd(CpuTiledEW{}, grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c,
                    temperature, chunk, need_rows, need_cols);
}

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("nt_xent_fwd", &nt_xent_fwd_cpu);
  m.impl("nt_xent_bwd", &nt_xent_bwd_cpu);
  m.impl("nt_xent_tiled_fwd", &nt_xent_tiled_fwd_cpu);
  m.impl("nt_xent_tiled_bwd", &nt_xent_tiled_bwd_cpu);
}

}  // namespace ssl_ops
