// Tile math of the NT-Xent op, shared by the CPU kernels (cpu/nt_xent_cpu.cpp) and the CUDA
// kernels (cuda/). Everything here is scalar, branch-light and __host__ __device__,
// so the CPU tests exercise exactly the formulas the GPU runs; only the tile products (BLAS on
// the CPU, tensor cores on the GPU) and the reductions (loops vs warp shuffles) differ.
//
// Notation (see common/nt_xent.py, nt_xent_reference, for the contract):
//   rows [R, d] anchors, cols [C, d] candidates, T temperature.
//   inv_r[i] = 1 / max(||rows_i||, eps), inv_c[j] likewise (eps = 1e-12 as in F.normalize).
//   logit_ij = (rows_i . cols_j) * inv_r[i] * inv_c[j] / T   (never rounded to the input dtype)
//   lse_i    = logsumexp_{j != self_i} logit_ij              (online, running max + sum)
//   loss_i   = lse_i - logit_{i, pos_i}
//   dloss_i / dlogit_ij = softmax_ij - [j == pos_i]          (softmax_{i, self_i} = 0)
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define NTX_HD __host__ __device__ __forceinline__
#else
#define NTX_HD inline
#endif

namespace ntx {

// F.normalize's eps: x / max(||x||, eps).
constexpr double kNormEps = 1e-12;

template <typename acc_t>
NTX_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// 1 / max(sqrt(sum_sq), eps). sum_sq accumulated in acc_t (fp32, or fp64 for fp64 inputs).
template <typename acc_t>
NTX_HD acc_t inv_norm(acc_t sum_sq) {
  using std::sqrt;  // the float overload for float (host and device), not ::sqrt(double)
  const acc_t n = sqrt(sum_sq);
  return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

// True when the norm was clamped to eps: then normalisation is the linear map x / eps and its
// Jacobian is I / eps (no projection term).
template <typename acc_t>
NTX_HD bool norm_clamped(acc_t sum_sq) {
  using std::sqrt;
  return !(sqrt(sum_sq) > acc_t(kNormEps));
}

// exp for x <= ~0 (arguments are always "logit - running max" or "logit - lse").
// Host fp32: a Cephes-style polynomial with magic-number rounding and no calls, so that GCC
// vectorises the tile loops with plain SSE2 (std::exp would be a scalar libm call per element).
// Max error ~2 ulp; exact 0 for x < -87 (in particular for the -inf of the self column).
// Device: the CUDA expf. fp64 (gradcheck only): std::exp.
NTX_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f;  // Cody-Waite split of ln 2
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n by building the exponent bits; n in [-126, 128) after the clamp.
  union {
    float f;
    int32_t i;
  } tb, sc;
  tb.f = t;
  const int32_t ni = tb.i - 0x4B400000;  // integer n from the mantissa of t
  sc.i = (ni + 127) << 23;
  const float v = p * sc.f;
  return x < -87.0f ? 0.0f : v;
#endif
}

NTX_HD double fast_exp(double x) {
  return std::exp(x);
}

// The CUDA kernels work in base 2: logits pre-scaled by log2(e) (folded into the per-column
// factor inv_c / T), so that every exponential is one exp2 (ex2.approx plus range handling on
// the GPU) instead of expf's extra multiply and fix-ups. Converted back with ln 2 where a
// natural-log value leaves a kernel (lse, positive logit, running max).
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

NTX_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);  // not used by the CPU kernels; here for completeness
#endif
}

NTX_HD double fast_exp2(double x) {
  return std::exp2(x);
}

// logit_ij from the raw dot product of the (unnormalised) inputs.
template <typename acc_t>
NTX_HD acc_t logit(acc_t dot, acc_t inv_r, acc_t inv_c, acc_t inv_t) {
  return dot * (inv_r * inv_c * inv_t);
}

// Online log-sum-exp state of one row: running max m and sum l = sum_j exp(logit_j - m).
// Empty state: m = -inf, l = 0.
template <typename acc_t>
struct LseState {
  acc_t m;
  acc_t l;
};

// Merge two partial states (a tile's, another lane's): rescale the smaller-max sum.
// Guards the -inf - -inf = NaN case of two empty states.
template <typename acc_t>
NTX_HD LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<acc_t>()) return {m, acc_t(0)};
  return {m, a.l * fast_exp(a.m - m) + b.l * fast_exp(b.m - m)};
}

// Merge of two partial states kept in base 2 (m = max of log2-scaled logits, l = sum of
// 2^(x - m)); same guard as lse_merge.
template <typename acc_t>
NTX_HD LseState<acc_t> lse_merge2(LseState<acc_t> a, LseState<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<acc_t>()) return {m, acc_t(0)};
  return {m, a.l * fast_exp2(a.m - m) + b.l * fast_exp2(b.m - m)};
}

template <typename acc_t>
NTX_HD acc_t lse_finish(LseState<acc_t> s) {
  using std::log;
  return s.m + log(s.l);  // l == 0 (no candidate at all) gives -inf, as the reference's NaN row
}

// d loss_i / d logit_ij = softmax_ij - onehot(pos_i), with the self column exactly 0.
template <typename acc_t>
NTX_HD acc_t softmax_minus_onehot(acc_t logit_ij, acc_t lse_i, bool is_self, bool is_pos) {
  const acc_t p = is_self ? acc_t(0) : fast_exp(logit_ij - lse_i);
  return is_pos ? p - acc_t(1) : p;
}

// The same from a log2-scaled logit and log2-scaled lse (CUDA kernels).
template <typename acc_t>
NTX_HD acc_t softmax_minus_onehot2(acc_t logit2_ij, acc_t lse2_i, bool is_self, bool is_pos) {
  const acc_t p = is_self ? acc_t(0) : fast_exp2(logit2_ij - lse2_i);
  return is_pos ? p - acc_t(1) : p;
}

// Backward of xhat = x / max(||x||, eps) for one element:
//   grad_x = (grad_xhat - xhat * <grad_xhat, xhat>) * inv   (norm > eps)
//   grad_x = grad_xhat * inv                                (norm clamped to eps)
template <typename acc_t>
NTX_HD acc_t normalize_backward(acc_t grad_xhat, acc_t xhat, acc_t dot_gx, acc_t inv,
                                bool clamped) {
  return (clamped ? grad_xhat : grad_xhat - xhat * dot_gx) * inv;
}

}  // namespace ntx
