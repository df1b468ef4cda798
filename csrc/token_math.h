// Per-element math of the token statistics, shared verbatim by the C++ CPU row passes
// (logprobs_cpu.cpp) and the CUDA kernels (cuda/logprobs_cuda.cu): the CPU tests exercise the
// same formulas the GPU runs.
//
// Notation and symbol table: docs/math.md, "Running sums" (the same names as the Triton kernels).
// z / zr raw policy / reference logits, l = z / tau and l_ref = zr / tau tempered logits,
// m = max_j l_j, m_ref = max_j l_ref_j, x_j = l_j - m <= 0, x_ref_j = l_ref_j - m_ref <= 0,
// e_j = exp(x_j). A row pass accumulates
//   sum_exp     = sum e_j                -> lse = m + log sum_exp
//   sum_exp_x   = sum e_j x_j            -> entropy = log sum_exp - sum_exp_x / sum_exp
//   sum_exp_ref = sum exp(x_ref_j)       -> ref_lse = m_ref + log sum_exp_ref
//   sum_exp_dx  = sum e_j (x_j - x_ref_j) -> KL(p||q) = sum_exp_dx / sum_exp - log sum_exp + log sum_exp_ref
//   sum_exp_sq  = sum e_j^2              -> sum_j p_j^2 = sum_exp_sq / sum_exp^2 (the adaptive actor
//                                           coefficient's ||d logp_y / d l|| = sqrt(1 - 2 p_y + sum p^2))
// Shifting both rows by their own max before differencing keeps KL and entropy free of the
// cancellation that sum p (l - l_ref) - (lse - ref_lse) suffers when the logits carry large
// row offsets.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VIMPO_HD __host__ __device__ __forceinline__
#else
#define VIMPO_HD inline
#endif

namespace vimpo {

// exp(x) for x <= 0 (shifted logits). On the CPU a branch-free polynomial that GCC vectorizes
// under `omp simd` (libm's expf does not); 7th-order Taylor on |r| <= ln2/2 is accurate to
// ~1e-7 relative, i.e. to fp32 rounding. Below -87 the result is clamped to ~1.6e-38 instead
// of flushing to 0: such a term is < 1e-37 of the row sum, which always contains exp(0) = 1.
// Vectorizing it needs -fno-trapping-math under GCC (setup.py): otherwise the clamp's compare
// stays a branch and every row pass runs scalar, 3-5x slower (measured).
VIMPO_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = std::fma(n, -0.693145751953125f, x);  // Cody-Waite: ln2 split into hi + lo
  r = std::fma(n, -1.428606765330187045e-6f, r);
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126: a normal float
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

VIMPO_HD double exp_nonpos(double x) { return exp(x); }

// ---- forward: finish a row from its sums ----------------------------------------------------

template <class T>
VIMPO_HD T row_lse(T row_max, T sum_exp) { return row_max + log(sum_exp); }

template <class T>
VIMPO_HD T row_entropy(T sum_exp, T sum_exp_x) { return log(sum_exp) - sum_exp_x / sum_exp; }

template <class T>
VIMPO_HD T row_kl(T sum_exp, T sum_exp_dx, T sum_exp_ref) {
  return sum_exp_dx / sum_exp - log(sum_exp) + log(sum_exp_ref);
}

// ||d logp_y / d l||_2 = sqrt(1 - 2 p_y + sum_j p_j^2) = sqrt((1 - p_y)^2 + sum_{j != y} p_j^2),
// from the target's e_y = exp(x_y) (the term the sums hold) and the row sums. As written first
// it cancels to rounding noise when p_y -> 1 (fp32: ~3e-4 absolute error in a norm of ~1e-6);
// in the second form 1 - p_y = (sum_exp - e_y) / sum_exp carries only the sums' rounding, and the
// sum over j != y, itself a difference, is clamped to [0, (1 - p_y)^2], where it must lie.
template <class T>
VIMPO_HD T row_logit_grad_norm(T e_y, T sum_exp, T sum_exp_sq) {
  const T rest = sum_exp - e_y;  // sum_{j != y} e_j
  T rest_sq = sum_exp_sq - e_y * e_y;
  rest_sq = rest_sq < T(0) ? T(0) : (rest_sq > rest * rest ? rest * rest : rest_sq);
  return sqrt(rest * rest + rest_sq) / sum_exp;
}

// A row constant c (an lse) kept in fp64 and applied as hi + lo in T. In the backward,
// logp_j = (l_j - hi) - lo: l_j - hi is exact wherever p_j matters (l_j within a factor 2 of
// c), so logp_j carries only the logits' own rounding. A single fp32 lse would add ulp(c) / 2
// to every logp_j (1e-6 at |c| ~ 40), which the KL and entropy gradients amplify: they weigh
// logp_j - logq_j - KL, a difference of numbers that nearly cancel when pi ~ pi_ref.
template <class T>
struct SplitConst {
  T hi, lo;
};

template <class T>
VIMPO_HD SplitConst<T> split_const(double c) {
  const T hi = T(c);
  return {hi, T(c - double(hi))};
}

// ---- online merge of partial row sums ------------------------------------------------------
// Sums over a part of the vocabulary, each relative to that part's own maxima m (policy) and
// m_ref (reference). Merging rescales by scale = exp(dm), dm = old max - new max; the shifted
// sums also move by the max difference: sum e (x + dm) = sum_exp_x + sum_exp dm. A part with
// sum_exp = 0 is empty (its max may be -inf, so it must not enter the arithmetic). Without a
// reference, m_ref / sum_exp_ref / sum_exp_dx are unused. The squares move by the square of
// the scale: sum (e scale)^2 = sum_exp_sq scale^2.
template <class T>
struct RowSums {
  T m, sum_exp, sum_exp_x, m_ref, sum_exp_ref, sum_exp_dx, sum_exp_sq;
};

template <class T>
VIMPO_HD T rescaled(T scale, T sum, T sum_exp, T dm) {
  return scale == T(0) ? T(0) : scale * (sum + sum_exp * dm);
}

template <class T>
VIMPO_HD RowSums<T> merge_row_sums(const RowSums<T>& a, const RowSums<T>& b) {
  if (a.sum_exp == T(0)) return b;
  if (b.sum_exp == T(0)) return a;
  RowSums<T> o;
  o.m = a.m > b.m ? a.m : b.m;
  o.m_ref = a.m_ref > b.m_ref ? a.m_ref : b.m_ref;
  const T scale_a = exp(a.m - o.m), scale_b = exp(b.m - o.m);
  o.sum_exp = a.sum_exp * scale_a + b.sum_exp * scale_b;
  o.sum_exp_x = rescaled(scale_a, a.sum_exp_x, a.sum_exp, a.m - o.m) +
                rescaled(scale_b, b.sum_exp_x, b.sum_exp, b.m - o.m);
  o.sum_exp_ref = a.sum_exp_ref * exp(a.m_ref - o.m_ref) + b.sum_exp_ref * exp(b.m_ref - o.m_ref);
  o.sum_exp_dx = rescaled(scale_a, a.sum_exp_dx, a.sum_exp, (a.m - o.m) - (a.m_ref - o.m_ref)) +
                 rescaled(scale_b, b.sum_exp_dx, b.sum_exp, (b.m - o.m) - (b.m_ref - o.m_ref));
  o.sum_exp_sq = a.sum_exp_sq * scale_a * scale_a + b.sum_exp_sq * scale_b * scale_b;
  return o;
}

// One entry folded into a part's sums: merge_row_sums(s, one-entry part) (a one-entry part
// has max = the entry, x = 0, e = 1) with ONE exp per model instead of that merge's two, one
// of which is always exp(0). When the entry raises the max, the old sums are rescaled by
// exp(old max - entry) and the entry adds e = 1, x = 0; otherwise the sums stay and the entry
// adds e = exp(entry - max), x = entry - max. The CUDA row passes call this per logit (the CPU
// passes reduce vectorized blocks and merge those). An entry of -inf (a masked vocabulary id)
// has e = 0 and must not enter e * x (0 * -inf).
template <class T>
VIMPO_HD void accumulate_entry(RowSums<T>& s, T l, T l_ref, bool has_ref) {
  if (s.sum_exp == T(0)) {
    s = RowSums<T>{l, T(1), T(0), l_ref, has_ref ? T(1) : T(0), T(0), T(1)};
    return;
  }
  T scale = T(1), dm = T(0), e, x;  // dm = old max - new max (<= 0); e, x: the entry's
  const T d = l - s.m;
  if (d > T(0)) {
    scale = exp(-d);
    dm = -d;
    e = T(1);
    x = T(0);
    s.m = l;
  } else {
    e = exp(d);
    x = d;
  }
  T dm_ref = T(0), x_ref = T(0);
  if (has_ref) {
    const T dr = l_ref - s.m_ref;
    if (dr > T(0)) {
      s.sum_exp_ref = s.sum_exp_ref * exp(-dr) + T(1);
      dm_ref = -dr;
      s.m_ref = l_ref;
    } else {
      s.sum_exp_ref += exp(dr);
      x_ref = dr;
    }
  }
  const bool live = e != T(0);
  s.sum_exp_x = rescaled(scale, s.sum_exp_x, s.sum_exp, dm) + (live ? e * x : T(0));
  s.sum_exp_dx = rescaled(scale, s.sum_exp_dx, s.sum_exp, dm - dm_ref) + (live ? e * (x - x_ref) : T(0));
  s.sum_exp_sq = s.sum_exp_sq * scale * scale + e * e;
  s.sum_exp = s.sum_exp * scale + e;
}

// ---- backward: d loss / d tempered logit of one vocabulary entry --------------------------
// With p_j = exp(logp_j), logq_j the reference log-prob, k = KL(p||q), H = entropy:
//   d logp_y / d l_j = 1[j=y] - p_j
//   d k      / d l_j = p_j (logp_j - logq_j - k)
//   d H      / d l_j = -p_j (logp_j + H)
// The caller adds g_logp once at the target entry (the 1[j=y] term).
template <class T>
VIMPO_HD T dlogit_entry(T p, T logp_j, T logq_j, T g_logp, T g_kl, T kl, T g_ent, T ent) {
  return p * (-g_logp + g_kl * (logp_j - logq_j - kl) - g_ent * (logp_j + ent));
}

// ---- PPO-clipped actor loss (GRPO / Dr.GRPO / DAPO): d loss / d logp of one token ----------
// docs/math.md, "PPO clip and dual clip" and vimpo_loss/reference.py `ppo_actor_loss`: with
// Delta = clamp(logp - old, -20, 20) and ratio = exp(Delta), the token carries gradient iff
// |Delta| < 20 and
//   (A > 0 and ratio <= 1 + eps_high)  or  (A < 0 and 1 - eps_low <= ratio <= c).
// Then d(-A ratio)/d logp = -A ratio. `agg_w` is the token's weight in the aggregation
// (1/N for token-mean, 1/(B' L_i) for seq-mean-token-mean, ...), `is_w` the rollout
// importance weight. The optional k3 KL penalty kl_coeff * agg(exp(d) - 1 - d), d = ref - logp,
// adds kl_coeff * agg_w * (1 - exp(d)).
struct PPOParams {
  double clip_low;
  double clip_high;
  double clip_c;
  double kl_coeff;
};

constexpr double kLogRatioClamp = 20.0;

template <class T>
VIMPO_HD bool ppo_token_active(T log_ratio, T adv, const PPOParams& prm) {
  const T ratio = exp(log_ratio);
  const bool in_range = fabs(log_ratio) < T(kLogRatioClamp);
  const bool pos = adv > T(0) && ratio <= T(1.0 + prm.clip_high);
  const bool neg = adv < T(0) && ratio >= T(1.0 - prm.clip_low) && ratio <= T(prm.clip_c);
  return in_range && (pos || neg);
}

template <class T>
VIMPO_HD T ppo_dloss_dlogp(T logp, T old_logp, T adv, T agg_w, T is_w, T ref_logp, const PPOParams& prm) {
  T log_ratio = logp - old_logp;
  log_ratio = log_ratio > T(kLogRatioClamp) ? T(kLogRatioClamp)
            : (log_ratio < T(-kLogRatioClamp) ? T(-kLogRatioClamp) : log_ratio);
  T g = ppo_token_active(log_ratio, adv, prm) ? -adv * exp(log_ratio) * is_w * agg_w : T(0);
  if (prm.kl_coeff > 0) g += T(prm.kl_coeff) * agg_w * (T(1) - exp(ref_logp - logp));
  return g;
}

}  // namespace vimpo
