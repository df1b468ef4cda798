// The chunked log-prob ops, one orchestration for both devices.
//
// Memory plan: rows are processed `chunk` at a time. A chunk's logits z = h W^T (+ b) are
// computed by an ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA) into a reused (chunk, V) buffer,
// reduced by a row pass (row_passes.h), and in backward recomputed and overwritten in place
// with d loss / d z, which two more GEMMs turn into d_hidden (chunk rows of it) and d_weight
// (accumulated over chunks in fp32, or fp64 for fp64 input). Extra memory is one or two chunk
// buffers plus the gradients themselves, independent of N.
//
// Dtypes (`Plan`): the logits buffers, row passes, per-token outputs and gradient accumulators
// are fp64 for fp64 input, fp32 otherwise. GEMM operands:
//  - CPU, and fp32/fp64 or mixed-dtype input anywhere: the accumulation dtype. Low-precision
//    tensors are upcast (a V x H fp32 copy of the weight per call), so every product is exact
//    in fp32 and the sums are fp32 (the measured CPU design; the exact path).
//  - CUDA, hidden and weights all bf16: the GEMMs run on bf16 tensor cores with fp32 output
//    (ATen's `mm` / `addmm` `out_dtype` overloads, cuBLAS with CUBLAS_COMPUTE_32F): the logits
//    are the exact bf16 x bf16 products summed in fp32, as with the upcast, without the upcast
//    copy and at tensor-core rate. The backward's logit gradient is written in bf16 (one
//    rounding of a value computed in fp32, ~2^-9 relative, the rounding torch's own bf16
//    backward applies to its logit gradient) and enters the d_hidden / d_weight GEMMs as a bf16
//    operand; d_hidden rows come out in fp32, d_weight accumulates over chunks in fp32 (beta = 1)
//    and both are cast to bf16 once, at the end.
//  - CUDA, all fp16: the forward as for bf16; the backward on the upcast path, since an fp16
//    logit gradient flushes g * p_j below 6e-8 to zero (5-bit exponent) without loss scaling.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "params.h"
#include "row_passes.h"

namespace vimpo {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

template <class T>
T* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <class T>
const T* cptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

template <class T>
RowPasses<T> row_passes_for(const Tensor& like) {
  if (like.is_cuda()) {
#ifdef VIMPO_WITH_CUDA
    return {false, cuda::forward_rows<T>, cuda::backward_rows<T>, cuda::grpo_rows<T>};
#else
    TORCH_CHECK(false, "vimpo_kernels._C was built without CUDA; rebuild with VIMPO_BUILD_CUDA=1");
#endif
  }
  TORCH_CHECK(like.is_cpu(), "vimpo_kernels._C: tensors must be on CPU or CUDA, got ", like.device());
  return {true, cpu::forward_rows<T>, cpu::backward_rows<T>, cpu::grpo_rows<T>};
}

at::ScalarType compute_dtype(const Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtypes of one call (header comment).
struct Plan {
  at::ScalarType acc;      // logits buffers, row passes, per-token outputs, gradient accumulators
  at::ScalarType operand;  // GEMM operands: hidden rows, weights and (backward) the logit gradient
  bool low_precision() const { return operand != acc; }
};

// `others`: the remaining GEMM operands (weights, reference hidden); undefined ones are skipped.
// `with_grad`: the call runs the gradient GEMMs (backward, GRPO forward-gradient).
Plan plan_for(const Tensor& hidden, std::initializer_list<Tensor> others, bool with_grad) {
  const at::ScalarType dt = hidden.scalar_type();
  Plan p{compute_dtype(hidden), compute_dtype(hidden)};
  bool same = true;
  for (const Tensor& t : others) same = same && (!t.defined() || t.scalar_type() == dt);
  const bool low = hidden.is_cuda() && same && (dt == at::kBFloat16 || dt == at::kHalf);
  if (low && (dt == at::kBFloat16 || !with_grad)) p.operand = dt;
  return p;
}

// out <- a b, the product of two `operand` matrices, into an `acc` matrix.
void mm_into(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) at::mm_out(out, a, b);
  else at::mm_out(out, a, b, out.scalar_type());  // bf16/fp16 operands, fp32 output (cuBLAS, fp32 compute)
}

// Rows per chunk. CPU: 64 MiB per logits buffer (512 rows at V = 32768). MKL's GEMMs with
// a small chunk dimension lose speed: at H = 1024, V = 32768 on 2 EPYC cores the forward GEMMs
// of 128-row chunks took 1.2x a full-size GEMM, 512-row chunks 1.0x; d_weight (K = chunk)
// likewise. The buffers stay well under the d_weight accumulator (V x H fp32, 128 MiB there),
// which every method pays.
// CUDA: kCudaChunkBytes = 1.25 GiB per fp32 logits buffer, rounded down to a multiple of 256 rows
// (whole cuBLAS tiles): 2048 rows at V = 151936, i.e. 2048 x 151936 x 4 B = 1.16 GiB per buffer.
// A call holds at most two fp32 buffers (policy + reference) and, in the bf16 backward, one bf16
// gradient buffer (0.58 GiB): 2.3 GiB in the forward, 2.9 GiB in a backward with a KL gradient,
// 1.7 GiB with a detached KL, next to the V x H fp32 d_weight accumulator (2.3 GiB at H = 4096).
// Why so large: the d_weight GEMM (K = chunk rows) reads and writes its V x H fp32 accumulator
// once per chunk, 8 B per 2 * K FLOPs: 512 FLOP/B at K = 2048, above an H100's ridge (989 TFLOP/s
// / 3.35 TB/s = 295 FLOP/B), so compute-bound; at the former 256 MiB budget (441 rows) 110
// FLOP/B, memory-bound on 5 GB of accumulator traffic per chunk. `chunk_rows` (TokenStatsParams /
// GrpoParams, VIMPO_CHUNK_ROWS) overrides the budget.
constexpr int64_t kCpuChunkBytes = int64_t(64) << 20;
constexpr int64_t kCudaChunkBytes = int64_t(5) << 28;

int64_t chunk_rows(int64_t requested, int64_t n_rows, int64_t vocab, const at::TensorOptions& compute) {
  if (requested > 0) return std::max<int64_t>(1, std::min(requested, n_rows));
  const bool cuda = compute.device().is_cuda();
  const int64_t elem = int64_t(c10::elementSize(c10::typeMetaToScalarType(compute.dtype())));
  int64_t rows = (cuda ? kCudaChunkBytes : kCpuChunkBytes) / std::max<int64_t>(1, vocab * elem);
  if (cuda && rows >= 256) rows -= rows % 256;
  return std::max<int64_t>(1, std::min(n_rows, std::max<int64_t>(16, rows)));
}

void check_head(const char* name, const Tensor& hidden, const Tensor& weight, const Tensor& bias) {
  TORCH_CHECK(hidden.dim() == 2, name, ": hidden must be (N, H), got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), name,
              ": weight must be (V, H) with H = hidden.size(1) = ", hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.device() == hidden.device(), name, ": weight is on ", weight.device(), ", hidden on ",
              hidden.device());
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), name, ": bias must be (V,) with V = ",
                weight.size(0), ", got ", bias.sizes());
    TORCH_CHECK(bias.device() == hidden.device(), name, ": bias must be on ", hidden.device());
  }
}

void check_rows(const char* name, const Tensor& t, int64_t n, const Tensor& like) {
  if (!t.defined()) return;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be (", n, ",), got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// One LM head: the GEMM operands of every chunk, in the plan's operand dtype.
struct Head {
  Tensor hidden;  // (N, H), any float dtype; converted chunk by chunk
  Tensor weight;  // (V, H) operand dtype, contiguous
  Tensor bias;    // (V,) accumulation dtype, or undefined
  at::ScalarType operand, acc;

  Head(const Tensor& h, const Tensor& w, const Tensor& b, const Plan& plan)
      : hidden(h.contiguous()), weight(w.to(plan.operand).contiguous()),
        bias(b.defined() ? b.to(plan.acc).contiguous() : b), operand(plan.operand), acc(plan.acc) {}

  Tensor rows(int64_t r0, int64_t n) const { return hidden.narrow(0, r0, n).to(operand); }

  // out (acc) <- logits of `rows`: (V, n) = W rows^T + b when vocab-major, else (n, V) = rows W^T + b
  void logits_into(Tensor& out, const Tensor& rows, bool vocab_major) const {
    if (vocab_major) {
      mm_into(out, weight, rows.t());
      if (bias.defined()) out.add_(bias.unsqueeze(1));
    } else {
      mm_into(out, rows, weight.t());
      if (bias.defined()) out.add_(bias);
    }
  }

  // Logits of `rows` (n, H) at the vocabulary ids idx (n, K) only: (n, K). K dot products per
  // row, one id column at a time (an n x H temporary) -- 2 n K H flops instead of the 2 n V H
  // of a full chunk GEMM when only K entries per row are needed.
  // In the accumulation dtype: bf16 operands are upcast here (n x H, small), so the products are
  // exact and summed in fp32, as the GEMM does.
  Tensor logits_at(const Tensor& rows, const Tensor& idx) const {
    Tensor out = at::empty(idx.sizes(), rows.options().dtype(acc));
    const Tensor rows_acc = rows.to(acc);
    for (int64_t k = 0; k < idx.size(1); ++k) {
      const Tensor ids = idx.select(1, k);
      Tensor col = (rows_acc * weight.index_select(0, ids).to(acc)).sum(1);
      if (bias.defined()) col.add_(bias.index_select(0, ids));
      out.select(1, k).copy_(col);
    }
    return out;
  }
};

// A contiguous view of the first n rows' worth of a reused chunk buffer, in the passes' layout.
Tensor chunk_view(const Tensor& buf, int64_t n, int64_t vocab, bool vocab_major) {
  Tensor flat = buf.narrow(0, 0, n * vocab);
  return vocab_major ? flat.view({vocab, n}) : flat.view({n, vocab});
}

// Gradient accumulators of the chunk loop's backward GEMMs.
// All in the accumulation dtype (fp32 for bf16): d_hidden rows are written once each, d_weight
// and d_bias sum over chunks; `finish` casts each once.
struct HeadGrads {
  Tensor d_hidden, d_weight, d_bias;

  HeadGrads(const Head& head, bool need_dh, bool need_dw, bool need_db) {
    auto opts = head.weight.options().dtype(head.acc);
    if (need_dh) d_hidden = at::empty({head.hidden.size(0), head.hidden.size(1)}, opts);
    if (need_dw) d_weight = at::zeros_like(head.weight, opts);
    if (need_db) d_bias = at::zeros({head.weight.size(0)}, opts);
  }

  // dlogits of rows [r0, r0 + n) ((V, n) when vocab-major, else (n, V)), in the operand dtype
  // like `rows` -> d_hidden rows, += d_weight, += d_bias
  void accumulate(const Tensor& dlogits, const Tensor& rows, const Head& head, int64_t r0, bool vocab_major) {
    const Tensor d = vocab_major ? dlogits : dlogits.t();  // (V, n) view either way
    const bool low = d.scalar_type() != head.acc;
    if (d_hidden.defined()) {
      Tensor out = d_hidden.narrow(0, r0, rows.size(0));
      mm_into(out, d.t(), head.weight);
    }
    if (d_weight.defined()) {
      // bf16 x bf16 with fp32 compute, added into the fp32 accumulator by cuBLAS (beta = 1): no
      // bf16 partial sum, no separate read-modify-write pass.
      if (low) at::addmm_out(d_weight, d_weight, d, rows, head.acc, /*beta=*/1, /*alpha=*/1);
      else d_weight.addmm_(d, rows);
    }
    if (d_bias.defined()) d_bias.add_(low ? d.sum(1, /*keepdim=*/false, head.acc) : d.sum(1));
  }

  std::vector<Tensor> finish(const Tensor& hidden_like, const Tensor& weight_like, const Tensor& bias_like) const {
    auto cast = [](const Tensor& g, const Tensor& like) {
      return g.defined() && like.defined() ? g.to(like.scalar_type()) : Tensor();
    };
    return {cast(d_hidden, hidden_like), cast(d_weight, weight_like), cast(d_bias, bias_like)};
  }
};

// Candidate-set KL (docs/math.md, "KL estimators"): the K largest policy logits of each row of a chunk (ATen's
// topk on the chunk buffer, either device; tempering is monotone, so the raw logits rank the
// same) and the KL restricted to them with the full normalisers. Runs after the row pass,
// which supplies the lse's; the ids are kept (N x K) so the backward reuses the same set.
struct Candidates {
  Tensor idx;         // (n, K) vocabulary ids
  Tensor logp, logq;  // (n, K) fp64 log-probs of the candidates under both models
  Tensor p;           // (n, K) fp64 policy probabilities
};

// The K largest logits of each row of a chunk buffer, as (n, K) ids.
Tensor top_ids(const Tensor& z, int64_t k, bool vocab_major) {
  const Tensor idx = std::get<1>(at::topk(z, k, vocab_major ? 0 : 1, /*largest=*/true, /*sorted=*/false));
  return (vocab_major ? idx.t() : idx).contiguous();
}

// The raw logits of a chunk buffer at the (n, K) ids, as (n, K).
Tensor logits_of_buffer(const Tensor& z, const Tensor& idx, bool vocab_major) {
  return vocab_major ? z.gather(0, idx.t()).t() : z.gather(1, idx);
}

// `z_k`, `zr_k`: the raw policy and reference logits at `idx`. They are tempered in the compute
// dtype, as the row passes form them, then taken to fp64 against the fp64 lse's.
Candidates candidates_of(const Tensor& idx, const Tensor& z_k, const Tensor& zr_k, double inv_temp,
                         const Tensor& lse, const Tensor& ref_lse) {
  Candidates c;
  c.idx = idx;
  c.logp = z_k.mul(inv_temp).to(at::kDouble) - lse.unsqueeze(1);
  c.logq = zr_k.mul(inv_temp).to(at::kDouble) - ref_lse.unsqueeze(1);
  c.p = c.logp.exp();
  return c;
}

template <class T>
std::vector<Tensor> forward_impl(const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& targets,
                                 const Tensor& ref_hidden, const Tensor& ref_weight, const Tensor& ref_bias,
                                 const TokenStatsParams& p) {
  const Plan plan = plan_for(hidden, {weight, ref_hidden, ref_weight}, /*with_grad=*/false);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool has_ref = ref_hidden.defined();
  const Head head(hidden, weight, bias, plan);
  std::optional<Head> ref_head;
  if (has_ref) ref_head.emplace(ref_hidden, ref_weight.defined() ? ref_weight : weight, ref_bias, plan);
  const auto opts = hidden.options().dtype(plan.acc);
  const auto opts64 = opts.dtype(at::kDouble);  // the lse's: token_math.h `SplitConst`
  Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts64);
  Tensor ref_logp, ref_lse, kl, entropy;
  if (has_ref) {
    ref_logp = at::empty({N}, opts);
    ref_lse = at::empty({N}, opts64);
    if (p.want_kl) kl = at::empty({N}, opts);
  }
  if (p.want_entropy) entropy = at::empty({N}, opts);
  Tensor grad_norm = p.want_grad_norm ? at::empty({N}, opts) : Tensor();
  const bool candidate_set = p.want_kl && p.topk > 0;
  const int64_t K = std::min(p.topk, V);
  Tensor cand_idx = candidate_set ? at::empty({N, K}, hidden.options().dtype(at::kLong)) : Tensor();
  const RowPasses<T> passes = row_passes_for<T>(hidden);
  const int64_t C = chunk_rows(p.chunk_rows, N, V, opts);
  Tensor buf = at::empty({C * V}, opts);
  Tensor ref_buf = has_ref ? at::empty({C * V}, opts) : Tensor();
  const Tensor tgt = targets.contiguous();
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t n = std::min(C, N - r0);
    const bool vm = passes.vocab_major;
    Tensor z = chunk_view(buf, n, V, vm), zr;
    head.logits_into(z, head.rows(r0, n), vm);
    if (has_ref) {
      zr = chunk_view(ref_buf, n, V, vm);
      ref_head->logits_into(zr, ref_head->rows(r0, n), vm);
    }
    ForwardRows<T> a{z.const_data_ptr<T>(), has_ref ? zr.const_data_ptr<T>() : nullptr,
                     tgt.const_data_ptr<int64_t>() + r0, n, V, T(1.0 / p.temperature),
                     logp.data_ptr<T>() + r0, lse.data_ptr<double>() + r0,
                     has_ref ? ref_logp.data_ptr<T>() + r0 : nullptr,
                     has_ref ? ref_lse.data_ptr<double>() + r0 : nullptr,
                     kl.defined() && !candidate_set ? kl.data_ptr<T>() + r0 : nullptr,
                     entropy.defined() ? entropy.data_ptr<T>() + r0 : nullptr,
                     grad_norm.defined() ? grad_norm.data_ptr<T>() + r0 : nullptr};
    passes.forward(a);
    if (candidate_set) {
      const Tensor idx = top_ids(z, K, vm);
      const Candidates c = candidates_of(idx, logits_of_buffer(z, idx, vm), logits_of_buffer(zr, idx, vm),
                                         1.0 / p.temperature, lse.narrow(0, r0, n), ref_lse.narrow(0, r0, n));
      kl.narrow(0, r0, n).copy_((c.p * (c.logp - c.logq)).sum(1));
      cand_idx.narrow(0, r0, n).copy_(c.idx);
    }
  }
  return {logp, lse, ref_logp, ref_lse, kl, entropy, cand_idx, grad_norm};
}

template <class T>
std::vector<Tensor> backward_impl(const Tensor& grad_logp, const Tensor& grad_kl, const Tensor& grad_entropy,
                                  const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& targets,
                                  const Tensor& ref_hidden, const Tensor& ref_weight, const Tensor& ref_bias,
                                  const Tensor& lse, const Tensor& ref_lse, const Tensor& kl, const Tensor& entropy,
                                  const Tensor& cand_idx, const TokenStatsParams& p) {
  const Plan plan = plan_for(hidden, {weight, ref_hidden, ref_weight}, /*with_grad=*/true);
  const at::ScalarType dt = plan.acc;
  const int64_t N = hidden.size(0), V = weight.size(0);
  // The reference logits are recomputed only when the KL carries a gradient (non-detached KL);
  // for the candidate-set KL only at the K candidates of each row, not as a full chunk.
  const bool with_ref = grad_kl.defined();
  const bool candidate_set = with_ref && cand_idx.defined();
  const bool ref_chunks = with_ref && !candidate_set;
  const Head head(hidden, weight, bias, plan);
  std::optional<Head> ref_head;
  if (with_ref) ref_head.emplace(ref_hidden, ref_weight.defined() ? ref_weight : weight, ref_bias, plan);
  HeadGrads grads(head, p.need_dh, p.need_dw, p.need_db && bias.defined());
  const auto opts = hidden.options().dtype(dt);
  const RowPasses<T> passes = row_passes_for<T>(hidden);
  const int64_t C = chunk_rows(p.chunk_rows, N, V, opts);
  Tensor buf = at::empty({C * V}, opts);
  Tensor ref_buf = ref_chunks ? at::empty({C * V}, opts) : Tensor();
  // bf16 plan: the row pass writes the logit gradient here, the gradient GEMMs' bf16 operand.
  const bool bf16_grad = plan.operand == at::kBFloat16;
  Tensor grad_buf = bf16_grad ? at::empty({C * V}, opts.dtype(at::kBFloat16)) : Tensor();
  const Tensor tgt = targets.contiguous();
  auto c = [&](const Tensor& t) { return t.defined() ? t.to(dt).contiguous() : t; };
  const Tensor g_logp = c(grad_logp), g_kl = c(grad_kl), g_ent = c(grad_entropy);
  auto c64 = [](const Tensor& t) { return t.defined() ? t.to(at::kDouble).contiguous() : t; };
  const Tensor lse_c = c64(lse), ref_lse_c = c64(ref_lse), kl_c = c(kl), ent_c = c(entropy);
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t n = std::min(C, N - r0);
    const bool vm = passes.vocab_major;
    Tensor z = chunk_view(buf, n, V, vm), zr;
    Tensor dz = bf16_grad ? chunk_view(grad_buf, n, V, vm) : z;  // d loss / d raw logits
    const Tensor rows = head.rows(r0, n);
    head.logits_into(z, rows, vm);
    if (ref_chunks) {
      zr = chunk_view(ref_buf, n, V, vm);
      ref_head->logits_into(zr, ref_head->rows(r0, n), vm);
    }
    auto at_r0 = [&](const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() + r0 : nullptr; };
    if (candidate_set) {
      // d k / d l_j = 1[j in K] p_j (logp_j - logq_j + 1) - p_j (k + P_K): the dense part is an
      // extra d loss / d logp for the policy-only pass (minus its 1[j = y] share, undone at
      // the target below); the sparse part is scattered at the K ids.
      const Tensor idx = cand_idx.narrow(0, r0, n);
      const Candidates cs = candidates_of(idx, logits_of_buffer(z, idx, vm),
                                          ref_head->logits_at(ref_head->rows(r0, n), idx), 1.0 / p.temperature,
                                          lse_c.narrow(0, r0, n), ref_lse_c.narrow(0, r0, n));
      const Tensor gk = g_kl.narrow(0, r0, n).to(at::kDouble);
      const Tensor shift = gk * (kl_c.narrow(0, r0, n).to(at::kDouble) + cs.p.sum(1));
      const Tensor g_dense = (g_logp.defined() ? g_logp.narrow(0, r0, n).to(at::kDouble) + shift : shift)
                                 .to(dt).contiguous();
      BackwardRows<T> a{z.data_ptr<T>(), nullptr, tgt.const_data_ptr<int64_t>() + r0, n, V, T(1.0 / p.temperature),
                        lse_c.const_data_ptr<double>() + r0, nullptr, nullptr, at_r0(ent_c),
                        g_dense.const_data_ptr<T>(), nullptr, g_ent.defined() ? at_r0(g_ent) : nullptr};
      passes.backward(a);
      const double it = 1.0 / p.temperature;
      const int64_t dim = vm ? 0 : 1;
      auto layout = [vm](const Tensor& rows_by_k) { return vm ? rows_by_k.t() : rows_by_k; };  // (n, K) -> buffer's
      z.scatter_add_(dim, layout(tgt.narrow(0, r0, n).unsqueeze(1)), layout((shift * -it).to(dt).unsqueeze(1)));
      z.scatter_add_(dim, layout(cs.idx), layout((gk.unsqueeze(1) * cs.p * (cs.logp - cs.logq + 1.0) * it).to(dt)));
      if (bf16_grad) dz.copy_(z);  // the sparse terms are added in fp32, then one rounding
    } else {
      BackwardRows<T> a{z.data_ptr<T>(), ref_chunks ? zr.const_data_ptr<T>() : nullptr,
                        tgt.const_data_ptr<int64_t>() + r0, n, V, T(1.0 / p.temperature),
                        lse_c.const_data_ptr<double>() + r0,
                        ref_chunks ? ref_lse_c.const_data_ptr<double>() + r0 : nullptr,
                        ref_chunks ? at_r0(kl_c) : nullptr, at_r0(ent_c), at_r0(g_logp), at_r0(g_kl),
                        g_ent.defined() ? at_r0(g_ent) : nullptr};
      if (bf16_grad) a.dlogits_bf16 = dz.data_ptr<at::BFloat16>();
      passes.backward(a);
    }
    grads.accumulate(dz, rows, head, r0, vm);
  }
  return grads.finish(hidden, weight, bias);
}

template <class T>
std::vector<Tensor> grpo_impl(const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& targets,
                              const Tensor& old_logp, const Tensor& adv, const Tensor& agg_w, const Tensor& is_w,
                              const Tensor& ref_logp, const GrpoParams& p) {
  const Plan plan = plan_for(hidden, {weight}, /*with_grad=*/true);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const Head head(hidden, weight, bias, plan);
  HeadGrads grads(head, p.need_dh, p.need_dw, p.need_db && bias.defined());
  const auto opts = hidden.options().dtype(plan.acc);
  Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts.dtype(at::kDouble)), dlogp = at::empty({N}, opts);
  const RowPasses<T> passes = row_passes_for<T>(hidden);
  const int64_t C = chunk_rows(p.chunk_rows, N, V, opts);
  Tensor buf = at::empty({C * V}, opts);
  const bool bf16_grad = plan.operand == at::kBFloat16;  // as in backward_impl
  Tensor grad_buf = bf16_grad ? at::empty({C * V}, opts.dtype(at::kBFloat16)) : Tensor();
  const Tensor tgt = targets.contiguous();
  auto c = [&](const Tensor& t) { return t.defined() ? t.to(plan.acc).contiguous() : t; };
  const Tensor old_c = c(old_logp), adv_c = c(adv), agg_c = c(agg_w), isw_c = c(is_w), ref_c = c(ref_logp);
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t n = std::min(C, N - r0);
    const bool vm = passes.vocab_major;
    Tensor z = chunk_view(buf, n, V, vm);
    Tensor dz = bf16_grad ? chunk_view(grad_buf, n, V, vm) : z;
    const Tensor rows = head.rows(r0, n);
    head.logits_into(z, rows, vm);
    auto at_r0 = [&](const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() + r0 : nullptr; };
    GrpoRows<T> a{z.data_ptr<T>(), tgt.const_data_ptr<int64_t>() + r0, n, V, T(1.0 / p.temperature),
                  at_r0(old_c), at_r0(adv_c), at_r0(agg_c), at_r0(isw_c), at_r0(ref_c), p.ppo(),
                  logp.data_ptr<T>() + r0, lse.data_ptr<double>() + r0, dlogp.data_ptr<T>() + r0};
    if (bf16_grad) a.dlogits_bf16 = dz.data_ptr<at::BFloat16>();
    passes.grpo(a);
    grads.accumulate(dz, rows, head, r0, vm);
  }
  std::vector<Tensor> out = {logp, lse, dlogp};
  for (auto& g : grads.finish(hidden, weight, bias)) out.push_back(g);
  return out;
}

void check_token_stats_inputs(const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& targets,
                              const Tensor& ref_hidden, const Tensor& ref_weight, const Tensor& ref_bias,
                              double temperature) {
  check_head("policy", hidden, weight, bias);
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  check_rows("targets", targets, hidden.size(0), hidden);
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  TORCH_CHECK(!ref_bias.defined() || ref_hidden.defined(), "ref_bias given without ref_hidden");
  TORCH_CHECK(!ref_weight.defined() || ref_hidden.defined(), "ref_weight given without ref_hidden");
  if (ref_hidden.defined()) {
    TORCH_CHECK(ref_hidden.size(0) == hidden.size(0), "ref_hidden must have ", hidden.size(0), " rows, got ",
                ref_hidden.size(0));
    const Tensor& rw = ref_weight.defined() ? ref_weight : weight;
    check_head("reference", ref_hidden, rw, ref_bias);
    TORCH_CHECK(rw.size(0) == weight.size(0), "reference vocabulary ", rw.size(0), " != policy vocabulary ",
                weight.size(0));
  }
}

}  // namespace

std::vector<Tensor> token_stats_forward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                        const Tensor& targets, const OptTensor& ref_hidden,
                                        const OptTensor& ref_weight, const OptTensor& ref_bias,
                                        const TokenStatsParams& p) {
  check_token_stats_inputs(hidden, weight, opt(bias), targets, opt(ref_hidden), opt(ref_weight), opt(ref_bias),
                           p.temperature);
  const at::OptionalDeviceGuard device_guard(at::device_of(hidden));  // GEMMs and launches on hidden's device
  TORCH_CHECK(!p.want_kl || ref_hidden.has_value(), "want_kl needs ref_hidden");
  TORCH_CHECK(p.topk >= 0, "topk must be >= 0 (0 = exact KL), got ", p.topk);
  if (compute_dtype(hidden) == at::kDouble)
    return forward_impl<double>(hidden, weight, opt(bias), targets, opt(ref_hidden), opt(ref_weight),
                                opt(ref_bias), p);
  return forward_impl<float>(hidden, weight, opt(bias), targets, opt(ref_hidden), opt(ref_weight), opt(ref_bias), p);
}

std::vector<Tensor> token_stats_backward(const OptTensor& grad_logp, const OptTensor& grad_kl,
                                         const OptTensor& grad_entropy, const Tensor& hidden, const Tensor& weight,
                                         const OptTensor& bias, const Tensor& targets, const OptTensor& ref_hidden,
                                         const OptTensor& ref_weight, const OptTensor& ref_bias, const Tensor& lse,
                                         const OptTensor& ref_lse, const OptTensor& kl, const OptTensor& entropy,
                                         const OptTensor& cand_idx, const TokenStatsParams& p) {
  check_token_stats_inputs(hidden, weight, opt(bias), targets, opt(ref_hidden), opt(ref_weight), opt(ref_bias),
                           p.temperature);
  const at::OptionalDeviceGuard device_guard(at::device_of(hidden));
  const int64_t N = hidden.size(0);
  for (auto& [name, t] : {std::pair<const char*, Tensor>{"grad_logp", opt(grad_logp)}, {"grad_kl", opt(grad_kl)},
                          {"grad_entropy", opt(grad_entropy)}, {"lse", lse}, {"ref_lse", opt(ref_lse)},
                          {"kl", opt(kl)}, {"entropy", opt(entropy)}})
    check_rows(name, t, N, hidden);
  TORCH_CHECK(!grad_kl.has_value() || (ref_hidden.has_value() && ref_lse.has_value() && kl.has_value()),
              "grad_kl needs ref_hidden, ref_lse and kl");
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(), "grad_entropy needs entropy");
  if (cand_idx.has_value())
    TORCH_CHECK(cand_idx->scalar_type() == at::kLong && cand_idx->dim() == 2 && cand_idx->size(0) == N &&
                    cand_idx->device() == hidden.device(),
                "cand_idx must be an int64 (", N, ", K) tensor on ", hidden.device());
  if (compute_dtype(hidden) == at::kDouble)
    return backward_impl<double>(opt(grad_logp), opt(grad_kl), opt(grad_entropy), hidden, weight, opt(bias), targets,
                                 opt(ref_hidden), opt(ref_weight), opt(ref_bias), lse, opt(ref_lse), opt(kl),
                                 opt(entropy), opt(cand_idx), p);
  return backward_impl<float>(opt(grad_logp), opt(grad_kl), opt(grad_entropy), hidden, weight, opt(bias), targets,
                              opt(ref_hidden), opt(ref_weight), opt(ref_bias), lse, opt(ref_lse), opt(kl),
                              opt(entropy), opt(cand_idx), p);
}

std::vector<Tensor> grpo_forward_grad(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                      const Tensor& targets, const OptTensor& old_logp, const Tensor& adv,
                                      const Tensor& agg_w, const OptTensor& is_w, const OptTensor& ref_logp,
                                      const GrpoParams& p) {
  check_token_stats_inputs(hidden, weight, opt(bias), targets, Tensor(), Tensor(), Tensor(), p.temperature);
  const at::OptionalDeviceGuard device_guard(at::device_of(hidden));
  const int64_t N = hidden.size(0);
  for (auto& [name, t] : {std::pair<const char*, Tensor>{"old_logp", opt(old_logp)}, {"adv", adv},
                          {"agg_w", agg_w}, {"is_w", opt(is_w)}, {"ref_logp", opt(ref_logp)}})
    check_rows(name, t, N, hidden);
  TORCH_CHECK(p.kl_coeff <= 0 || ref_logp.has_value(), "kl_coeff > 0 needs ref_logp");
  if (compute_dtype(hidden) == at::kDouble)
    return grpo_impl<double>(hidden, weight, opt(bias), targets, opt(old_logp), adv, agg_w, opt(is_w), opt(ref_logp),
                             p);
  return grpo_impl<float>(hidden, weight, opt(bias), targets, opt(old_logp), adv, agg_w, opt(is_w), opt(ref_logp), p);
}

// The per-token coefficient alone (CPU), so tests can hold it against autograd through the
// reference epilogue: the same `ppo_dloss_dlogp` the forward-gradient passes call.
Tensor grpo_dloss_dlogp(const Tensor& logp, const OptTensor& old_logp, const Tensor& adv, const Tensor& agg_w,
                        const OptTensor& is_w, const OptTensor& ref_logp, const GrpoParams& p) {
  TORCH_CHECK(logp.is_cpu() && logp.dim() == 1, "logp must be a 1-D CPU tensor");
  const int64_t N = logp.size(0);
  for (auto& [name, t] : {std::pair<const char*, Tensor>{"old_logp", opt(old_logp)}, {"adv", adv},
                          {"agg_w", agg_w}, {"is_w", opt(is_w)}, {"ref_logp", opt(ref_logp)}})
    check_rows(name, t, N, logp);
  TORCH_CHECK(p.kl_coeff <= 0 || ref_logp.has_value(), "kl_coeff > 0 needs ref_logp");
  const PPOParams prm = p.ppo();
  auto d = [](const Tensor& t) { return t.defined() ? t.to(at::kDouble).contiguous() : t; };
  const Tensor lp = d(logp), old = d(opt(old_logp)), a = d(adv), w = d(agg_w), iw = d(opt(is_w)), ref = d(opt(ref_logp));
  Tensor out = at::empty({N}, lp.options());
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < N; ++i) {
    const double l = lp.const_data_ptr<double>()[i];
    o[i] = ppo_dloss_dlogp<double>(l, old.defined() ? old.const_data_ptr<double>()[i] : l,
                                   a.const_data_ptr<double>()[i], w.const_data_ptr<double>()[i],
                                   iw.defined() ? iw.const_data_ptr<double>()[i] : 1.0,
                                   ref.defined() ? ref.const_data_ptr<double>()[i] : l, prm);
  }
  return out.to(logp.scalar_type());
}

}  // namespace vimpo
