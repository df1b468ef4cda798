// The per-chunk "row passes" of the chunked log-prob ops: everything between the GEMMs.
//
// The chunk loop (logprobs_chunked.cpp) computes a chunk of raw logits z = h W^T (+ b) with an
// ATen GEMM into a reused (rows, V) buffer and hands it to one of these passes; the CPU
// implementation (logprobs_cpu.cpp, OpenMP through ATen's parallel_for) and the CUDA one
// (cuda/logprobs_cuda.cu, one block per row) share the element math of token_math.h.
// Layout of a logits buffer is the passes' choice (`RowPasses::vocab_major`): the CPU passes take
// it vocab-major, (V, rows) contiguous, because MKL computes W h^T for a small chunk of rows
// faster than h W^T (measured 1.2-1.4x at 512-128 rows, H = 1024, V = 32768), and each thread of
// the row pass then streams a contiguous vocabulary range, vectorized across the chunk's rows;
// the CUDA passes take it row-major, (rows, V), so a block sweeps one row with coalesced loads. Per-token arrays are already offset to the
// chunk's first row; a null pointer means "not wanted" (outputs) or "zero" (gradients).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "token_math.h"

namespace vimpo {

template <class T>
struct ForwardRows {
  const T* logits;      // raw policy logits
  const T* ref_logits;  // raw reference logits, or null
  const int64_t* targets;
  int64_t rows, vocab;
  T inv_temp;
  T* logp;
  double* lse;  // fp64 for every T: see token_math.h `SplitConst`
  T* ref_logp;      // with ref_logits
  double* ref_lse;  // with ref_logits
  T* kl;        // with ref_logits, optional
  T* entropy;   // optional
  T* logit_grad_norm;  // optional: ||d logp_y / d tempered logits||_2 (adaptive actor coefficient)
};

template <class T>
struct BackwardRows {
  T* logits;            // in: raw policy logits; out: d loss / d raw logits
  const T* ref_logits;  // raw reference logits, only when grad_kl is given
  const int64_t* targets;
  int64_t rows, vocab;
  T inv_temp;
  const double* lse;
  const double* ref_lse;  // with ref_logits
  const T* kl;       // with ref_logits
  const T* entropy;  // with grad_entropy
  const T* grad_logp;
  const T* grad_kl;
  const T* grad_entropy;
  // CUDA only: when set, d loss / d raw logits go here as bf16 (rows, V) row-major, the operand
  // of the bf16 gradient GEMMs, instead of in place over `logits` (which is then left as is).
  c10::BFloat16* dlogits_bf16 = nullptr;
};

// GRPO-family forward-gradient pass: the per-token coefficient d loss / d logp only depends on
// the token's own logp and constants, so the pass writes d loss / d raw logits in place
// right after computing logp, and the chunk loop turns them into gradients without a
// recompute.
template <class T>
struct GrpoRows {
  T* logits;  // in: raw policy logits; out: d loss / d raw logits
  const int64_t* targets;
  int64_t rows, vocab;
  T inv_temp;
  const T* old_logp;  // null = on-policy (old := logp, ratio exactly 1)
  const T* adv;
  const T* agg_w;
  const T* is_w;      // null = 1
  const T* ref_logp;  // needed when params.kl_coeff > 0
  PPOParams params;
  T* logp;
  double* lse;
  T* dlogp;
  c10::BFloat16* dlogits_bf16 = nullptr;  // as in BackwardRows (CUDA only)
};

template <class T>
struct RowPasses {
  bool vocab_major;
  void (*forward)(const ForwardRows<T>&);
  void (*backward)(const BackwardRows<T>&);
  void (*grpo)(const GrpoRows<T>&);
};

namespace cpu {
template <class T> void forward_rows(const ForwardRows<T>& a);
template <class T> void backward_rows(const BackwardRows<T>& a);
template <class T> void grpo_rows(const GrpoRows<T>& a);
}  // namespace cpu

#ifdef VIMPO_WITH_CUDA
namespace cuda {
template <class T> void forward_rows(const ForwardRows<T>& a);
template <class T> void backward_rows(const BackwardRows<T>& a);
template <class T> void grpo_rows(const GrpoRows<T>& a);
}  // namespace cuda
#endif

}  // namespace vimpo
