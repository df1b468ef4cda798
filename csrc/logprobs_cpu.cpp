// CPU row passes of the chunked log-prob ops, over a vocab-major (V, rows) logits chunk.
//
// Rows are taken 16 at a time (one SIMD group: the 16 logits of a vocabulary entry are
// contiguous, so every inner loop is a plain vector loop over the group). The vocabulary is
// swept once in blocks of 256 entries (16 x 256 x 4 B = 16 KiB per buffer, L1-resident): a
// block's maxima, then its exp sums relative to them from L1, then an online merge
// (token_math.h `merge_row_sums`) into the row's running sums in fp64. So the chunk is read
// from memory once and every logit costs one exp. Groups are spread over ATen's OpenMP pool,
// so torch.set_num_threads governs GEMMs and passes alike.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "row_passes.h"

namespace vimpo {
namespace cpu {
namespace {

constexpr int64_t kGroup = 16;
constexpr int64_t kBlock = 256;

// Running sums of one group of rows over the whole vocabulary. `ld` = rows of the chunk (the
// stride between vocabulary entries); `zr` null = no reference.
template <class T, int64_t G>
void group_sums(const T* z, const T* zr, int64_t ld, int64_t vocab, int64_t gn, T it, RowSums<double>* out) {
  const int64_t n = G > 0 ? G : gn;
  for (int64_t r = 0; r < n; ++r) out[r] = RowSums<double>{0, 0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < vocab; j0 += kBlock) {
    const int64_t j1 = std::min(vocab, j0 + kBlock);
    T m[kGroup], mr[kGroup], bz[kGroup], bzx[kGroup], bzr[kGroup], bzk[kGroup];
    for (int64_t r = 0; r < kGroup; ++r) {
      m[r] = mr[r] = -std::numeric_limits<T>::infinity();
      bz[r] = bzx[r] = bzr[r] = bzk[r] = T(0);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const T* col = z + j * ld;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) m[r] = std::max(m[r], col[r]);
    }
    // inv_temp > 0, so the max of the tempered logits is the tempered max.
    for (int64_t r = 0; r < n; ++r) m[r] *= it;
    if (zr == nullptr) {
      for (int64_t j = j0; j < j1; ++j) {
        const T* col = z + j * ld;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) {
          const T x = col[r] * it - m[r];
          const T e = exp_nonpos(x);
          bz[r] += e;
          bzx[r] += e * x;
        }
      }
    } else {
      for (int64_t j = j0; j < j1; ++j) {
        const T* col = zr + j * ld;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) mr[r] = std::max(mr[r], col[r]);
      }
      for (int64_t r = 0; r < n; ++r) mr[r] *= it;
      for (int64_t j = j0; j < j1; ++j) {
        const T* col = z + j * ld;
        const T* colr = zr + j * ld;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) {
          const T x = col[r] * it - m[r];
          const T xr = colr[r] * it - mr[r];
          const T e = exp_nonpos(x);
          bz[r] += e;
          bzx[r] += e * x;
          bzr[r] += exp_nonpos(xr);
          bzk[r] += e * (x - xr);
        }
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const RowSums<double> blk{double(m[r]), double(bz[r]), double(bzx[r]),
                                zr ? double(mr[r]) : 0.0, double(bzr[r]), double(bzk[r])};
      out[r] = merge_row_sums(out[r], blk);
    }
  }
}

template <class T>
void sums_of_group(const T* z, const T* zr, int64_t ld, int64_t vocab, int64_t gn, T it, RowSums<double>* out) {
  // The full group gets a compile-time trip count, so its inner loops are exact vector loops.
  if (gn == kGroup) group_sums<T, kGroup>(z, zr, ld, vocab, gn, it, out);
  else group_sums<T, 0>(z, zr, ld, vocab, gn, it, out);
}

template <class T>
void forward_group(const ForwardRows<T>& a, int64_t g0, int64_t gn) {
  const int64_t ld = a.rows;
  RowSums<double> s[kGroup];
  sums_of_group<T>(a.logits + g0, a.ref_logits ? a.ref_logits + g0 : nullptr, ld, a.vocab, gn, a.inv_temp, s);
  for (int64_t k = 0; k < gn; ++k) {
    const int64_t r = g0 + k, y = a.targets[r];
    const T lse = T(row_lse(s[k].m, s[k].z));
    a.lse[r] = lse;
    a.logp[r] = a.logits[y * ld + r] * a.inv_temp - lse;
    if (a.entropy) a.entropy[r] = T(row_entropy(s[k].z, s[k].zx));
    if (a.ref_logits == nullptr) continue;
    const T ref_lse = T(row_lse(s[k].mr, s[k].zr));
    a.ref_lse[r] = ref_lse;
    a.ref_logp[r] = a.ref_logits[y * ld + r] * a.inv_temp - ref_lse;
    if (a.kl) a.kl[r] = T(row_kl(s[k].z, s[k].zk, s[k].zr));
  }
}

template <class T>
void backward_group(const BackwardRows<T>& a, int64_t g0, int64_t gn) {
  const int64_t ld = a.rows;
  const T it = a.inv_temp;
  T lse[kGroup], g[kGroup], g_kl[kGroup], kl[kGroup], g_ent[kGroup], ent[kGroup], ref_lse[kGroup];
  for (int64_t k = 0; k < kGroup; ++k) {
    const int64_t r = g0 + std::min(k, gn - 1);  // pad the group with its last row's values
    lse[k] = a.lse[r];
    g[k] = a.grad_logp ? a.grad_logp[r] : T(0);
    g_ent[k] = a.grad_entropy ? a.grad_entropy[r] : T(0);
    ent[k] = a.grad_entropy ? a.entropy[r] : T(0);
    g_kl[k] = a.grad_kl ? a.grad_kl[r] : T(0);
    kl[k] = a.ref_logits ? a.kl[r] : T(0);
    ref_lse[k] = a.ref_logits ? a.ref_lse[r] : T(0);
  }
  // d loss / d raw logit = (d loss / d tempered logit) / tau.
  for (int64_t j = 0; j < a.vocab; ++j) {
    T* col = a.logits + j * ld + g0;
    if (a.ref_logits == nullptr) {
#pragma omp simd
      for (int64_t k = 0; k < gn; ++k) {
        const T logp_j = col[k] * it - lse[k];
        col[k] = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, T(0), g[k], T(0), T(0), g_ent[k], ent[k]) * it;
      }
    } else {
      const T* colr = a.ref_logits + j * ld + g0;
#pragma omp simd
      for (int64_t k = 0; k < gn; ++k) {
        const T logp_j = col[k] * it - lse[k];
        const T logq_j = colr[k] * it - ref_lse[k];
        col[k] = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, logq_j, g[k], g_kl[k], kl[k], g_ent[k], ent[k]) * it;
      }
    }
  }
  for (int64_t k = 0; k < gn; ++k) a.logits[a.targets[g0 + k] * ld + g0 + k] += g[k] * it;
}

template <class T>
void grpo_group(const GrpoRows<T>& a, int64_t g0, int64_t gn) {
  const int64_t ld = a.rows;
  const T it = a.inv_temp;
  RowSums<double> s[kGroup];
  sums_of_group<T>(a.logits + g0, nullptr, ld, a.vocab, gn, it, s);
  T lse[kGroup], scale[kGroup];
  for (int64_t k = 0; k < kGroup; ++k) lse[k] = scale[k] = T(0);
  for (int64_t k = 0; k < gn; ++k) {
    const int64_t r = g0 + k;
    lse[k] = T(row_lse(s[k].m, s[k].z));
    const T logp = a.logits[a.targets[r] * ld + r] * it - lse[k];
    const T old = a.old_logp ? a.old_logp[r] : logp;
    const T is_w = a.is_w ? a.is_w[r] : T(1);
    const T ref = a.ref_logp ? a.ref_logp[r] : logp;
    const T g = ppo_dloss_dlogp<T>(logp, old, a.adv[r], a.agg_w[r], is_w, ref, a.params);
    a.logp[r] = logp;
    a.lse[r] = lse[k];
    a.dlogp[r] = g;
    scale[k] = -g * it;
  }
  for (int64_t j = 0; j < a.vocab; ++j) {
    T* col = a.logits + j * ld + g0;
#pragma omp simd
    for (int64_t k = 0; k < gn; ++k) col[k] = exp_nonpos(col[k] * it - lse[k]) * scale[k];
  }
  for (int64_t k = 0; k < gn; ++k) a.logits[a.targets[g0 + k] * ld + g0 + k] -= scale[k];
}

template <class Args, class Fn>
void parallel_groups(const Args& a, Fn fn) {
  const int64_t groups = (a.rows + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t g0 = gi * kGroup;
      fn(a, g0, std::min(kGroup, a.rows - g0));
    }
  });
}

}  // namespace

template <class T>
void forward_rows(const ForwardRows<T>& a) { parallel_groups(a, forward_group<T>); }
template <class T>
void backward_rows(const BackwardRows<T>& a) { parallel_groups(a, backward_group<T>); }
template <class T>
void grpo_rows(const GrpoRows<T>& a) { parallel_groups(a, grpo_group<T>); }

template void forward_rows<float>(const ForwardRows<float>&);
template void forward_rows<double>(const ForwardRows<double>&);
template void backward_rows<float>(const BackwardRows<float>&);
template void backward_rows<double>(const BackwardRows<double>&);
template void grpo_rows<float>(const GrpoRows<float>&);
template void grpo_rows<double>(const GrpoRows<double>&);

}  // namespace cpu
}  // namespace vimpo
