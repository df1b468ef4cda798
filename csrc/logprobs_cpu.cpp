// CPU row passes of the chunked log-prob ops: one fused pass per row of a logits chunk,
// rows spread over ATen's OpenMP pool (so torch.set_num_threads governs GEMMs and passes alike).
//
// A row of V fp32 logits (128 KiB at V = 32768) stays in L2 between its two sweeps (max, then
// the exp sums), so the logits chunk is read from memory once. Sums are accumulated per
// 1024-entry block in the SIMD lanes (fp32 for fp32 input) and the blocks in fp64: the
// rounding error of a block sum is ~sqrt(128) ulp, and of the whole row no more.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "row_passes.h"

namespace vimpo {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1024;

template <class T>
T row_max(const T* z, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, z[j]);
  return m;
}

struct Sums {
  double z = 0, zx = 0, zr = 0, zk = 0;
};

// Sums of the policy row alone (no reference): z_sum and zx_sum of token_math.h.
template <class T>
Sums policy_sums(const T* z, int64_t n, T inv_temp, T m) {
  Sums s;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    T bz = 0, bzx = 0;
#pragma omp simd reduction(+ : bz, bzx)
    for (int64_t j = b0; j < b1; ++j) {
      const T x = z[j] * inv_temp - m;
      const T e = exp_nonpos(x);
      bz += e;
      bzx += e * x;
    }
    s.z += bz;
    s.zx += bzx;
  }
  return s;
}

// Sums of the policy and reference rows together (one sweep over both).
template <class T>
Sums paired_sums(const T* z, const T* zr, int64_t n, T inv_temp, T m, T mr) {
  Sums s;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    T bz = 0, bzx = 0, bzr = 0, bzk = 0;
#pragma omp simd reduction(+ : bz, bzx, bzr, bzk)
    for (int64_t j = b0; j < b1; ++j) {
      const T x = z[j] * inv_temp - m;
      const T xr = zr[j] * inv_temp - mr;
      const T e = exp_nonpos(x);
      bz += e;
      bzx += e * x;
      bzr += exp_nonpos(xr);
      bzk += e * (x - xr);
    }
    s.z += bz;
    s.zx += bzx;
    s.zr += bzr;
    s.zk += bzk;
  }
  return s;
}

template <class T>
void forward_row(const ForwardRows<T>& a, int64_t r) {
  const int64_t V = a.vocab;
  const T* z = a.logits + r * V;
  const int64_t y = a.targets[r];
  // inv_temp > 0, so the max of the tempered row is the tempered max.
  const T m = row_max(z, V) * a.inv_temp;
  if (a.ref_logits == nullptr) {
    const Sums s = policy_sums(z, V, a.inv_temp, m);
    const T lse = row_lse<T>(m, T(s.z));
    a.lse[r] = lse;
    a.logp[r] = z[y] * a.inv_temp - lse;
    if (a.entropy) a.entropy[r] = T(row_entropy<double>(s.z, s.zx));
    return;
  }
  const T* zr = a.ref_logits + r * V;
  const T mr = row_max(zr, V) * a.inv_temp;
  const Sums s = paired_sums(z, zr, V, a.inv_temp, m, mr);
  const T lse = row_lse<T>(m, T(s.z));
  const T ref_lse = row_lse<T>(mr, T(s.zr));
  a.lse[r] = lse;
  a.logp[r] = z[y] * a.inv_temp - lse;
  a.ref_lse[r] = ref_lse;
  a.ref_logp[r] = zr[y] * a.inv_temp - ref_lse;
  if (a.kl) a.kl[r] = T(row_kl<double>(s.z, s.zk, s.zr));
  if (a.entropy) a.entropy[r] = T(row_entropy<double>(s.z, s.zx));
}

template <class T>
void backward_row(const BackwardRows<T>& a, int64_t r) {
  const int64_t V = a.vocab;
  T* z = a.logits + r * V;
  const int64_t y = a.targets[r];
  const T it = a.inv_temp;
  const T lse = a.lse[r];
  const T g = a.grad_logp ? a.grad_logp[r] : T(0);
  const T g_ent = a.grad_entropy ? a.grad_entropy[r] : T(0);
  const T ent = a.grad_entropy ? a.entropy[r] : T(0);
  // d loss / d raw logit = (d loss / d tempered logit) / tau.
  if (a.ref_logits == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T logp_j = z[j] * it - lse;
      z[j] = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, T(0), g, T(0), T(0), g_ent, ent) * it;
    }
  } else {
    const T* zr = a.ref_logits + r * V;
    const T ref_lse = a.ref_lse[r];
    const T g_kl = a.grad_kl ? a.grad_kl[r] : T(0);
    const T kl = a.kl[r];
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T logp_j = z[j] * it - lse;
      const T logq_j = zr[j] * it - ref_lse;
      z[j] = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, logq_j, g, g_kl, kl, g_ent, ent) * it;
    }
  }
  z[y] += g * it;
}

template <class T>
void grpo_row(const GrpoRows<T>& a, int64_t r) {
  const int64_t V = a.vocab;
  T* z = a.logits + r * V;
  const int64_t y = a.targets[r];
  const T it = a.inv_temp;
  const T m = row_max(z, V) * it;
  const T lse = row_lse<T>(m, T(policy_sums(z, V, it, m).z));
  const T logp = z[y] * it - lse;
  const T old = a.old_logp ? a.old_logp[r] : logp;
  const T is_w = a.is_w ? a.is_w[r] : T(1);
  const T ref = a.ref_logp ? a.ref_logp[r] : logp;
  const T g = ppo_dloss_dlogp<T>(logp, old, a.adv[r], a.agg_w[r], is_w, ref, a.params);
  a.logp[r] = logp;
  a.lse[r] = lse;
  a.dlogp[r] = g;
  const T scale = -g * it;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) z[j] = exp_nonpos(z[j] * it - lse) * scale;
  z[y] += g * it;
}

template <class Args, class Fn>
void parallel_rows(const Args& a, Fn fn) {
  at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(a, r);
  });
}

}  // namespace

template <class T>
void forward_rows(const ForwardRows<T>& a) { parallel_rows(a, forward_row<T>); }
template <class T>
void backward_rows(const BackwardRows<T>& a) { parallel_rows(a, backward_row<T>); }
template <class T>
void grpo_rows(const GrpoRows<T>& a) { parallel_rows(a, grpo_row<T>); }

template void forward_rows<float>(const ForwardRows<float>&);
template void forward_rows<double>(const ForwardRows<double>&);
template void backward_rows<float>(const BackwardRows<float>&);
template void backward_rows<double>(const BackwardRows<double>&);
template void grpo_rows<float>(const GrpoRows<float>&);
template void grpo_rows<double>(const GrpoRows<double>&);

}  // namespace cpu
}  // namespace vimpo
