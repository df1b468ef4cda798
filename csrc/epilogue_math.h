// The VIMPO sequence epilogue, per sequence: shared verbatim by the CPU driver (epilogue.cpp,
// sequences in parallel) and the CUDA kernels (cuda/epilogue_cuda.cu, one thread per
// sequence), so the CPU tests exercise the GPU's arithmetic. The formulas are written out in
// docs/math.md; vimpo_kernels/vimpo_loss/reference.py is the definition.
//
// Two passes with an O(B) host step between them, because the second pass needs batch-wide
// numbers the first one produces (and, under data parallelism, an all-reduce of them):
//   scan_sequence   token term u, implicit value S = sum u, and the reverse lambda-scan A_raw
//   host            residual e = S - y, value loss and dL/dS, whitening mean and 1/std
//                   (all-reduced over the process group), aggregation weights
//   token_pass      whitened advantage, PPO clipped + dual-clipped loss and its metrics, and
//                   the per-token gradient coefficients dL/dlogp and dL/dkl
// Everything is fp64: the epilogue is O(B*T), its inputs are cast once.
#pragma once

#include <cmath>
#include <cstdint>

#include "params.h"  // EpilogueParams: beta, lam, kl_estimator, ... (both passes)
#include "token_math.h"

namespace vimpo {

enum KlEstimator : int { kKlGiven = 0, kKlK2 = 2, kKlK3 = 3 };  // given: exact or candidate set

// k of docs/math.md, "KL estimators" for one token: the given KL, or k2/k3 from d = logref - logp.
VIMPO_HD double token_kl(double logp, double ref, double kl_given, int64_t est) {
  if (est == kKlGiven) return kl_given;
  const double d = ref - logp;
  return est == kKlK2 ? 0.5 * d * d : exp(d) - 1.0 - d;
}

// One sequence (row stride 1, length T): u[t] = beta (logp - ref - k) m, adv_raw[t] =
// u[t] + lam adv_raw[next valid t] on valid positions and 0 on padding (gamma = 1;
// docs/math.md, "Token term and implicit value", "Actor advantage and whitening").
// Returns S = sum_t u[t]. `kl` may be null when the estimator forms k itself.
VIMPO_HD double scan_sequence(const double* logp, const double* ref, const double* kl, const double* m,
                              int64_t T, const EpilogueParams& p, double* u, double* adv_raw) {
  double seq_value = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const double k = token_kl(logp[t], ref[t], kl ? kl[t] : 0.0, p.kl_estimator);
    u[t] = m[t] > 0 ? p.beta * (logp[t] - ref[t]) - p.beta * k : 0.0;
    seq_value += u[t];
  }
  double carry = 0.0;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (m[t] > 0) carry = u[t] + p.lam * carry;
    adv_raw[t] = m[t] > 0 ? carry : 0.0;
  }
  return seq_value;
}

// Per-sequence sums of the token pass (over valid tokens).
struct TokenSums {
  double loss;        // sum w_agg * l_pg (the sequence's share of the aggregated actor loss)
  double clip;        // count of loss2 > loss1
  double clip_lower;  // count of (clipped > loss3 and adv < 0)
  double neg_log_ratio;
};

// One sequence: whitened advantage (written to adv), the PPO loss
// (docs/math.md, "PPO clip and dual clip") aggregated with the per-token weight agg_w
// (d aggregate / d token loss), and the gradient coefficients
//   g_logp = dL/dS * du/dlogp + c_A * agg_w * d l_pg / d logp     (docs/math.md, "Closed-form gradients")
//   g_kl   = -beta * dL/dS      (only for a given KL that is not detached)
// `old` null = on-policy (ratio exactly 1); `is_w` null = 1.
VIMPO_HD TokenSums token_pass(const double* logp, const double* ref, const double* old, const double* is_w,
                              const double* m, const double* adv_raw, const double* agg_w, int64_t T,
                              double dloss_dseq, const EpilogueParams& p, const double* batch, double* adv,
                              double* g_logp, double* g_kl) {
  const PPOParams ppo = p.ppo();
  const double adv_mean = batch[kAdvMean], adv_rstd = batch[kAdvRstd], actor_coeff = batch[kActorCoeff];
  TokenSums s{0.0, 0.0, 0.0, 0.0};
  for (int64_t t = 0; t < T; ++t) {
    if (!(m[t] > 0)) {
      adv[t] = g_logp[t] = 0.0;
      if (g_kl) g_kl[t] = 0.0;
      continue;
    }
    const double a = p.whiten ? (adv_raw[t] - adv_mean) * adv_rstd : adv_raw[t];
    adv[t] = a;
    const double o = old ? old[t] : logp[t];
    const double w = is_w ? is_w[t] : 1.0;
    double log_ratio = logp[t] - o;
    log_ratio = log_ratio > kLogRatioClamp ? kLogRatioClamp : (log_ratio < -kLogRatioClamp ? -kLogRatioClamp : log_ratio);
    const double ratio = exp(log_ratio);
    const double clamped = ratio < 1.0 - p.clip_low ? 1.0 - p.clip_low
                         : (ratio > 1.0 + p.clip_high ? 1.0 + p.clip_high : ratio);
    const double loss1 = -a * ratio, loss2 = -a * clamped;
    const double clipped = loss1 > loss2 ? loss1 : loss2;
    const double loss3 = -a * p.clip_c;
    const double dual = loss3 < clipped ? loss3 : clipped;
    s.loss += agg_w[t] * (a < 0 ? dual : clipped) * w;
    s.clip += loss2 > loss1 ? 1.0 : 0.0;
    s.clip_lower += (clipped > loss3 && a < 0) ? 1.0 : 0.0;
    s.neg_log_ratio -= log_ratio;

    double du_dlogp = p.beta;  // detached KL, or a given KL (its gradient goes to g_kl)
    if (!p.detach_kl && p.kl_estimator == kKlK2) du_dlogp = p.beta * (1.0 - (logp[t] - ref[t]));
    if (!p.detach_kl && p.kl_estimator == kKlK3) du_dlogp = p.beta * exp(ref[t] - logp[t]);
    const double g_actor = ppo_dloss_dlogp<double>(logp[t], o, a, agg_w[t], w, logp[t], ppo);
    g_logp[t] = dloss_dseq * du_dlogp + actor_coeff * g_actor;
    if (g_kl) g_kl[t] = -p.beta * dloss_dseq;
  }
  return s;
}

}  // namespace vimpo
