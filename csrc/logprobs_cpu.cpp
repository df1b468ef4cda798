// CPU row passes of the chunked log-prob ops, over a vocab-major (V, rows) logits chunk.
//
// Traversal. In a vocab-major chunk the logits of one vocabulary entry for all rows of the
// chunk are adjacent. Every thread takes one contiguous range of vocabulary entries and
// streams it front to back; every inner loop is a unit-stride vector loop over all rows of the
// chunk. The chunk is read (and in backward written) once, in address order, one sequential
// stream per thread, which the hardware prefetcher follows. Sweeping the whole vocabulary
// per 16-row group instead (one cache line per entry, a 1-2 KiB stride) re-enters every page
// of the buffer once per group and measured ~5x slower on a 2-core EPYC.
//
// Forward. The reductions (max, sum of exp, ...) run over the vocabulary, i.e. across the
// threads' ranges. A thread sweeps its range in blocks of kBlock entries (kBlock x rows x 4 B,
// cache resident): the block's maxima, then its exp sums relative to the running maxima, so
// every logit costs one exp. When a row's maximum grows the running sums are rescaled: one
// exp per row per block, 1/kBlock of the element work. Block sums are in T (at most kBlock
// terms), running sums in fp64; the threads' partial sums are merged with token_math.h
// `merge_row_sums`. Parallelism goes through ATen's pool, so torch.set_num_threads governs
// GEMMs and passes alike.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "row_passes.h"

namespace vimpo {
namespace cpu {
namespace {

constexpr int64_t kBlock = 16;

// Split [0, vocab) into one contiguous, kBlock-aligned range per task and run
// fn(task, j0, j1) on ATen's pool; a range may be empty when vocab is small.
template <class Fn>
int64_t parallel_vocab_ranges(int64_t vocab, Fn fn) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t per_task = (blocks + tasks - 1) / tasks * kBlock;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = std::min(vocab, t * per_task), j1 = std::min(vocab, j0 + per_task);
      fn(t, j0, j1);
    }
  });
  return tasks;
}

// Running sums of every row of the chunk over vocabulary entries [j0, j1) (docs/math.md,
// "Running sums"): policy maxima m, sum_exp, sum_exp_x, sum_exp_sq and, with a reference, its
// maxima m_ref, sum_exp_ref, sum_exp_dx. Written to out[0 .. rows); an empty range gives
// sum_exp = 0 ("empty" to the merge). Arrays named blk_* hold one block's sums.
template <class T>
class RangeSums {
 public:
  RangeSums(int64_t rows, bool with_ref)
      : n_(rows), ref_(with_ref), m_(rows), m_ref_(rows), dm_(rows), dm_ref_(rows), blk_sum_exp_(rows),
        blk_sum_exp_x_(rows), blk_sum_exp_ref_(rows), blk_sum_exp_dx_(rows), blk_sum_exp_sq_(rows),
        sum_exp_(rows, 0.0), sum_exp_x_(rows, 0.0), sum_exp_ref_(rows, 0.0), sum_exp_dx_(rows, 0.0),
        sum_exp_sq_(rows, 0.0) {}

  void sweep(const T* z, const T* zr, int64_t j0, int64_t j1, T it, RowSums<double>* out) {
    if (j0 >= j1) {
      for (int64_t r = 0; r < n_; ++r) out[r] = RowSums<double>{0, 0, 0, 0, 0, 0, 0};
      return;
    }
    // Start the maxima at the range's first entry: finite for finite logits, so the first
    // rescale multiplies zero sums by a finite factor (an -inf start would give 0 * inf).
    init_maxima(z + j0 * n_, m_.data(), it);
    if (ref_) init_maxima(zr + j0 * n_, m_ref_.data(), it);
    for (int64_t jb = j0; jb < j1; jb += kBlock) {
      const int64_t je = std::min(j1, jb + kBlock);
      raise_maxima(z, jb, je, it, m_.data(), dm_.data());
      if (ref_) raise_maxima(zr, jb, je, it, m_ref_.data(), dm_ref_.data());
      if (ref_) {
        rescale_running_sums<true>();
        block_sums<true>(z, zr, jb, je, it);
      } else {
        rescale_running_sums<false>();
        block_sums<false>(z, nullptr, jb, je, it);
      }
      add_block_sums();
    }
    for (int64_t r = 0; r < n_; ++r)
      out[r] = RowSums<double>{double(m_[r]), sum_exp_[r], sum_exp_x_[r], ref_ ? double(m_ref_[r]) : 0.0,
                               sum_exp_ref_[r], sum_exp_dx_[r], sum_exp_sq_[r]};
  }

 private:
  void init_maxima(const T* first, T* m, T it) {
#pragma omp simd
    for (int64_t r = 0; r < n_; ++r) m[r] = first[r] * it;
  }

  // m <- max(m, block max), dm <- old m - new m (<= 0). inv_temp > 0, so the max of the
  // tempered logits is the tempered max.
  void raise_maxima(const T* z, int64_t jb, int64_t je, T it, T* __restrict m, T* __restrict dm) {
    T* __restrict blk_max = blk_sum_exp_.data();  // scratch until block_sums overwrites it
#pragma omp simd
    for (int64_t r = 0; r < n_; ++r) blk_max[r] = -std::numeric_limits<T>::infinity();
    for (int64_t j = jb; j < je; ++j) {
      const T* __restrict col = z + j * n_;
#pragma omp simd
      for (int64_t r = 0; r < n_; ++r) blk_max[r] = std::max(blk_max[r], col[r]);
    }
#pragma omp simd
    for (int64_t r = 0; r < n_; ++r) {
      const T mn = std::max(m[r], blk_max[r] * it);
      dm[r] = m[r] - mn;
      m[r] = mn;
    }
  }

  // Sums relative to an old maximum move to the new one, with scale = exp(dm):
  // sum_exp' = scale sum_exp, sum_exp_x' = scale (sum_exp_x + sum_exp dm),
  // sum_exp_dx' = scale (sum_exp_dx + sum_exp (dm - dm_ref)), sum_exp_sq' = scale^2 sum_exp_sq,
  // sum_exp_ref' = exp(dm_ref) sum_exp_ref. dm = 0 gives scale = 1 exactly.
  template <bool kRef>
  void rescale_running_sums() {
    const T* __restrict dm = dm_.data();
    const T* __restrict dm_ref = dm_ref_.data();
    double* __restrict sum_exp = sum_exp_.data();
    double* __restrict sum_exp_x = sum_exp_x_.data();
    double* __restrict sum_exp_ref = sum_exp_ref_.data();
    double* __restrict sum_exp_dx = sum_exp_dx_.data();
    double* __restrict sum_exp_sq = sum_exp_sq_.data();
#pragma omp simd
    for (int64_t r = 0; r < n_; ++r) {
      const double scale = double(exp_nonpos(dm[r]));
      if constexpr (kRef) {
        sum_exp_dx[r] = scale * (sum_exp_dx[r] + sum_exp[r] * (double(dm[r]) - double(dm_ref[r])));
        sum_exp_ref[r] *= double(exp_nonpos(dm_ref[r]));
      }
      sum_exp_x[r] = scale * (sum_exp_x[r] + sum_exp[r] * double(dm[r]));
      sum_exp_sq[r] *= scale * scale;
      sum_exp[r] *= scale;
    }
  }

  // The block's sums relative to the (new) running maxima, one exp per logit (two with kRef).
  template <bool kRef>
  void block_sums(const T* zb, const T* zrb, int64_t jb, int64_t je, T it) {
    const T* __restrict m = m_.data();
    const T* __restrict m_ref = m_ref_.data();
    T* __restrict blk_sum_exp = blk_sum_exp_.data();
    T* __restrict blk_sum_exp_x = blk_sum_exp_x_.data();
    T* __restrict blk_sum_exp_ref = blk_sum_exp_ref_.data();
    T* __restrict blk_sum_exp_dx = blk_sum_exp_dx_.data();
    T* __restrict blk_sum_exp_sq = blk_sum_exp_sq_.data();
    for (T* b : {blk_sum_exp, blk_sum_exp_x, blk_sum_exp_ref, blk_sum_exp_dx, blk_sum_exp_sq})
      std::fill(b, b + n_, T(0));
    for (int64_t j = jb; j < je; ++j) {
      const T* __restrict col = zb + j * n_;
      const T* __restrict colr = kRef ? zrb + j * n_ : nullptr;
#pragma omp simd
      for (int64_t r = 0; r < n_; ++r) {
        const T x = col[r] * it - m[r];
        const T e = exp_nonpos(x);
        blk_sum_exp[r] += e;
        blk_sum_exp_x[r] += e * x;
        blk_sum_exp_sq[r] += e * e;
        if constexpr (kRef) {
          const T x_ref = colr[r] * it - m_ref[r];
          blk_sum_exp_ref[r] += exp_nonpos(x_ref);
          blk_sum_exp_dx[r] += e * (x - x_ref);
        }
      }
    }
  }

  void add_block_sums() {
    for (int64_t r = 0; r < n_; ++r) {
      sum_exp_[r] += double(blk_sum_exp_[r]);
      sum_exp_x_[r] += double(blk_sum_exp_x_[r]);
      sum_exp_sq_[r] += double(blk_sum_exp_sq_[r]);
    }
    if (!ref_) return;
    for (int64_t r = 0; r < n_; ++r) {
      sum_exp_ref_[r] += double(blk_sum_exp_ref_[r]);
      sum_exp_dx_[r] += double(blk_sum_exp_dx_[r]);
    }
  }

  int64_t n_;
  bool ref_;
  std::vector<T> m_, m_ref_, dm_, dm_ref_;
  std::vector<T> blk_sum_exp_, blk_sum_exp_x_, blk_sum_exp_ref_, blk_sum_exp_dx_, blk_sum_exp_sq_;
  std::vector<double> sum_exp_, sum_exp_x_, sum_exp_ref_, sum_exp_dx_, sum_exp_sq_;
};

// Row sums over the whole vocabulary: every task sweeps its range, then the partials merge.
template <class T>
std::vector<RowSums<double>> vocab_sums(const T* z, const T* zr, int64_t rows, int64_t vocab, T it) {
  const int64_t max_tasks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<RowSums<double>> part(max_tasks * rows);
  const int64_t tasks = parallel_vocab_ranges(vocab, [&](int64_t t, int64_t j0, int64_t j1) {
    RangeSums<T>(rows, zr != nullptr).sweep(z, zr, j0, j1, it, part.data() + t * rows);
  });
  std::vector<RowSums<double>> sums(part.begin(), part.begin() + rows);
  for (int64_t t = 1; t < tasks; ++t)
    for (int64_t r = 0; r < rows; ++r) sums[r] = merge_row_sums(sums[r], part[t * rows + r]);
  return sums;
}

// Elementwise over the chunk, vocabulary ranges in parallel: fn(j0, j1).
template <class Fn>
void parallel_entries(int64_t vocab, Fn fn) {
  parallel_vocab_ranges(vocab, [&](int64_t, int64_t j0, int64_t j1) { fn(j0, j1); });
}

// A per-row operand of the backward, dense: `fill` where the caller passed none.
template <class T>
std::vector<T> row_operand(const T* p, int64_t rows, T fill = T(0)) {
  return p ? std::vector<T>(p, p + rows) : std::vector<T>(rows, fill);
}

}  // namespace

template <class T>
void forward_rows(const ForwardRows<T>& a) {
  const int64_t n = a.rows;
  const T it = a.inv_temp;
  const std::vector<RowSums<double>> s = vocab_sums(a.logits, a.ref_logits, n, a.vocab, it);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t y = a.targets[r];
    const double lse = row_lse(s[r].m, s[r].sum_exp);
    a.lse[r] = lse;
    a.logp[r] = T(double(a.logits[y * n + r] * it) - lse);
    if (a.entropy) a.entropy[r] = T(row_entropy(s[r].sum_exp, s[r].sum_exp_x));
    if (a.logit_grad_norm) {
      // e_y as the passes summed it: the same shifted logit through the same exp.
      const double e_y = double(exp_nonpos(T(a.logits[y * n + r] * it - T(s[r].m))));
      a.logit_grad_norm[r] = T(row_logit_grad_norm(e_y, s[r].sum_exp, s[r].sum_exp_sq));
    }
    if (a.ref_logits == nullptr) continue;
    const double ref_lse = row_lse(s[r].m_ref, s[r].sum_exp_ref);
    a.ref_lse[r] = ref_lse;
    a.ref_logp[r] = T(double(a.ref_logits[y * n + r] * it) - ref_lse);
    if (a.kl) a.kl[r] = T(row_kl(s[r].sum_exp, s[r].sum_exp_dx, s[r].sum_exp_ref));
  }
}

// Per-row hi/lo halves of an fp64 row constant (token_math.h `SplitConst`); zeros when absent.
template <class T>
void split_rows(const double* c, int64_t rows, std::vector<T>& hi, std::vector<T>& lo) {
  hi.assign(rows, T(0));
  lo.assign(rows, T(0));
  if (c == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    const SplitConst<T> sc = split_const<T>(c[r]);
    hi[r] = sc.hi;
    lo[r] = sc.lo;
  }
}

// d loss / d raw logit = (d loss / d tempered logit) / tau, entry by entry (token_math.h
// `dlogit_entry`); the 1[j = y] term is added at the targets afterwards.
template <class T>
void backward_rows(const BackwardRows<T>& a) {
  const int64_t n = a.rows;
  const T it = a.inv_temp;
  const bool ref = a.ref_logits != nullptr;
  const std::vector<T> g_v = row_operand(a.grad_logp, n), g_ent_v = row_operand(a.grad_entropy, n),
                       ent_v = row_operand(a.grad_entropy ? a.entropy : nullptr, n),
                       g_kl_v = row_operand(ref ? a.grad_kl : nullptr, n), kl_v = row_operand(ref ? a.kl : nullptr, n);
  std::vector<T> lse_hi_v, lse_lo_v, ref_hi_v, ref_lo_v;
  split_rows(a.lse, n, lse_hi_v, lse_lo_v);
  split_rows(ref ? a.ref_lse : nullptr, n, ref_hi_v, ref_lo_v);
  const T *__restrict g = g_v.data(), *__restrict g_ent = g_ent_v.data(), *__restrict ent = ent_v.data(),
          *__restrict g_kl = g_kl_v.data(), *__restrict kl = kl_v.data(), *__restrict lse_hi = lse_hi_v.data(),
          *__restrict lse_lo = lse_lo_v.data(), *__restrict ref_hi = ref_hi_v.data(),
          *__restrict ref_lo = ref_lo_v.data();
  parallel_entries(a.vocab, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T* __restrict col = a.logits + j * n;
      if (!ref) {
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) {
          const T logp_j = (col[r] * it - lse_hi[r]) - lse_lo[r];
          col[r] = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, T(0), g[r], T(0), T(0), g_ent[r], ent[r]) * it;
        }
      } else {
        const T* __restrict colr = a.ref_logits + j * n;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) {
          const T logp_j = (col[r] * it - lse_hi[r]) - lse_lo[r];
          const T logq_j = (colr[r] * it - ref_hi[r]) - ref_lo[r];
          col[r] = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, logq_j, g[r], g_kl[r], kl[r], g_ent[r], ent[r]) * it;
        }
      }
    }
  });
  for (int64_t r = 0; r < n; ++r) a.logits[a.targets[r] * n + r] += g[r] * it;
}

// Forward sums -> logp -> the token's coefficient g = d loss / d logp (token_math.h
// `ppo_dloss_dlogp`) -> d loss / d raw logit = g (1[j = y] - p_j) / tau, in place. Only p_j
// is needed here (no difference of log-probs), so a rounded lse costs relative ulp only.
template <class T>
void grpo_rows(const GrpoRows<T>& a) {
  const int64_t n = a.rows;
  const T it = a.inv_temp;
  const std::vector<RowSums<double>> s = vocab_sums<T>(a.logits, nullptr, n, a.vocab, it);
  std::vector<T> lse(n), scale(n);
  for (int64_t r = 0; r < n; ++r) {
    const double lse_r = row_lse(s[r].m, s[r].sum_exp);
    lse[r] = T(lse_r);
    const T logp = T(double(a.logits[a.targets[r] * n + r] * it) - lse_r);
    const T old = a.old_logp ? a.old_logp[r] : logp;
    const T is_w = a.is_w ? a.is_w[r] : T(1);
    const T ref = a.ref_logp ? a.ref_logp[r] : logp;
    const T g = ppo_dloss_dlogp<T>(logp, old, a.adv[r], a.agg_w[r], is_w, ref, a.params);
    a.logp[r] = logp;
    a.lse[r] = lse_r;
    a.dlogp[r] = g;
    scale[r] = -g * it;
  }
  const T* __restrict lse_p = lse.data();
  const T* __restrict scale_p = scale.data();
  parallel_entries(a.vocab, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T* __restrict col = a.logits + j * n;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) col[r] = exp_nonpos(col[r] * it - lse_p[r]) * scale_p[r];
    }
  });
  for (int64_t r = 0; r < n; ++r) a.logits[a.targets[r] * n + r] -= scale[r];
}

template void forward_rows<float>(const ForwardRows<float>&);
template void forward_rows<double>(const ForwardRows<double>&);
template void backward_rows<float>(const BackwardRows<float>&);
template void backward_rows<double>(const BackwardRows<double>&);
template void grpo_rows<float>(const GrpoRows<float>&);
template void grpo_rows<double>(const GrpoRows<double>&);

}  // namespace cpu
}  // namespace vimpo
