// Arguments of the two epilogue passes (epilogue_math.h), as raw fp64 pointers over (B, T)
// row-major arrays: what the CPU driver and the CUDA kernels both consume.
#pragma once

#include <cstdint>

#include "epilogue_math.h"

namespace vimpo {

struct ScanArgs {
  const double *logp, *ref, *kl, *m;  // kl null for k2/k3
  int64_t B, T;
  EpilogueParams p;  // reads beta, lam, kl_estimator
  double *u, *adv_raw, *seq_value;
};

struct TokenArgs {
  const double *logp, *ref, *old, *is_w, *m, *adv_raw, *agg_w, *dloss_dseq;  // old, is_w may be null
  int64_t B, T;
  EpilogueParams p;
  const double* batch;          // EpilogueBatch: [adv_mean, adv_rstd, actor_coeff], on the data's device
  double *adv, *g_logp, *g_kl;  // g_kl may be null
  double* sums;                 // (B, 4): TokenSums per sequence
};

#ifdef VIMPO_WITH_CUDA
namespace cuda {
void epilogue_scan(const ScanArgs& a);
void epilogue_tokens(const TokenArgs& a);
}  // namespace cuda
#endif

}  // namespace vimpo
