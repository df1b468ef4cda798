// The VIMPO sequence epilogue op (epilogue_math.h): checks, then the two per-sequence passes
// on the input's device (a device guard makes it current, so the CUDA launches go to that
// device's current stream). No host synchronization: outputs stay on the device, and the
// batch-level numbers between the passes come in as a device tensor. CPU: sequences spread over ATen's pool, each walked by one thread.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <vector>

#include "epilogue_args.h"

namespace vimpo {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

void check_bt(const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kDouble, "vimpo epilogue: ", name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "vimpo epilogue: ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "vimpo epilogue: ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "vimpo epilogue: ", name, " must be contiguous");
}

void check_b(const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.size(0) == like.size(0) && t.is_contiguous() &&
                  t.device() == like.device(),
              "vimpo epilogue: ", name, " must be a contiguous float64 (", like.size(0), ",) tensor on ",
              like.device());
}

const double* ptr(const OptTensor& t) { return t.has_value() ? t->const_data_ptr<double>() : nullptr; }

bool on_cuda(const Tensor& like) {
  if (!like.is_cuda()) {
    TORCH_CHECK(like.is_cpu(), "vimpo epilogue: tensors must be on CPU or CUDA, got ", like.device());
    return false;
  }
#ifndef VIMPO_WITH_CUDA
  TORCH_CHECK(false, "vimpo_kernels._C was built without CUDA; rebuild with VIMPO_BUILD_CUDA=1");
#endif
  return true;
}

}  // namespace

// -> [u, adv_raw, seq_value]
std::vector<Tensor> vimpo_epilogue_scan(const Tensor& logp, const Tensor& ref, const OptTensor& kl,
                                        const Tensor& mask, const EpilogueParams& p) {
  TORCH_CHECK(logp.dim() == 2, "vimpo epilogue: logp must be (B, T), got ", logp.sizes());
  for (auto& [name, t] : {std::pair<const char*, Tensor>{"logp", logp}, {"ref_logp", ref}, {"mask", mask}})
    check_bt(name, t, logp);
  if (kl.has_value()) check_bt("token_kl", *kl, logp);
  TORCH_CHECK(p.kl_estimator == kKlK2 || p.kl_estimator == kKlK3 || (p.kl_estimator == kKlGiven && kl.has_value()),
              "vimpo epilogue: kl_estimator must be 0 (given token_kl), 2 or 3, got ", p.kl_estimator);
  const at::OptionalDeviceGuard device_guard(at::device_of(logp));
  const int64_t B = logp.size(0), T = logp.size(1);
  Tensor u = at::empty_like(logp), adv_raw = at::empty_like(logp), seq_value = at::empty({B}, logp.options());
  const ScanArgs a{logp.const_data_ptr<double>(), ref.const_data_ptr<double>(), ptr(kl),
                   mask.const_data_ptr<double>(), B, T, p,
                   u.data_ptr<double>(), adv_raw.data_ptr<double>(), seq_value.data_ptr<double>()};
  if (on_cuda(logp)) {
#ifdef VIMPO_WITH_CUDA
    cuda::epilogue_scan(a);
#endif
  } else {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t o = i * T;
        a.seq_value[i] = scan_sequence(a.logp + o, a.ref + o, a.kl ? a.kl + o : nullptr, a.m + o, T, a.p,
                                       a.u + o, a.adv_raw + o);
      }
    });
  }
  return {u, adv_raw, seq_value};
}

// -> [adv, g_logp, g_kl (None unless want_g_kl), sums (B, 4)]
std::vector<Tensor> vimpo_epilogue_tokens(const Tensor& logp, const Tensor& ref, const OptTensor& old_logp,
                                          const OptTensor& is_w, const Tensor& mask, const Tensor& adv_raw,
                                          const Tensor& agg_w, const Tensor& dloss_dseq, const Tensor& batch,
                                          const EpilogueParams& p) {
  TORCH_CHECK(logp.dim() == 2, "vimpo epilogue: logp must be (B, T), got ", logp.sizes());
  for (auto& [name, t] : {std::pair<const char*, Tensor>{"logp", logp}, {"ref_logp", ref}, {"mask", mask},
                          {"adv_raw", adv_raw}, {"agg_w", agg_w}})
    check_bt(name, t, logp);
  if (old_logp.has_value()) check_bt("old_logp", *old_logp, logp);
  if (is_w.has_value()) check_bt("rollout_is_weights", *is_w, logp);
  check_b("dloss_dseq", dloss_dseq, logp);
  TORCH_CHECK(batch.scalar_type() == at::kDouble && batch.dim() == 1 && batch.size(0) == kEpilogueBatchSize &&
                  batch.is_contiguous() && batch.device() == logp.device(),
              "vimpo epilogue: batch must be a contiguous float64 (", int(kEpilogueBatchSize), ",) tensor on ",
              logp.device(), " ([adv_mean, adv_rstd, actor_coeff])");
  TORCH_CHECK(p.clip_c > 1.0, "vimpo epilogue: clip_ratio_c must be > 1, got ", p.clip_c);
  const at::OptionalDeviceGuard device_guard(at::device_of(logp));
  const int64_t B = logp.size(0), T = logp.size(1);
  Tensor adv = at::empty_like(logp), g_logp = at::empty_like(logp);
  Tensor g_kl = p.want_g_kl ? at::empty_like(logp) : Tensor();
  Tensor sums = at::empty({B, 4}, logp.options());
  const TokenArgs a{logp.const_data_ptr<double>(), ref.const_data_ptr<double>(), ptr(old_logp), ptr(is_w),
                    mask.const_data_ptr<double>(), adv_raw.const_data_ptr<double>(), agg_w.const_data_ptr<double>(),
                    dloss_dseq.const_data_ptr<double>(), B, T, p, batch.const_data_ptr<double>(),
                    adv.data_ptr<double>(),
                    g_logp.data_ptr<double>(), p.want_g_kl ? g_kl.data_ptr<double>() : nullptr,
                    sums.data_ptr<double>()};
  if (on_cuda(logp)) {
#ifdef VIMPO_WITH_CUDA
    cuda::epilogue_tokens(a);
#endif
  } else {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t o = i * T;
        auto at_o = [o](const double* p) { return p ? p + o : nullptr; };
        const TokenSums s = token_pass(a.logp + o, a.ref + o, at_o(a.old), at_o(a.is_w), a.m + o, a.adv_raw + o,
                                       a.agg_w + o, T, a.dloss_dseq[i], a.p, a.batch, a.adv + o, a.g_logp + o,
                                       a.g_kl ? a.g_kl + o : nullptr);
        double* out = a.sums + 4 * i;
        out[0] = s.loss;
        out[1] = s.clip;
        out[2] = s.clip_lower;
        out[3] = s.neg_log_ratio;
      }
    });
  }
  return {adv, g_logp, g_kl, sums};
}

}  // namespace vimpo
