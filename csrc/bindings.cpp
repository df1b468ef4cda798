// Python bindings of vimpo_kernels._C. The ops themselves live in one file per op.
#include <torch/extension.h>

#include <vector>

namespace vimpo {
bool built_with_cuda() {
#ifdef VIMPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

using OptTensor = c10::optional<at::Tensor>;

// logprobs_chunked.cpp
std::vector<at::Tensor> token_stats_forward(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                                            const at::Tensor& targets, const OptTensor& ref_hidden,
                                            const OptTensor& ref_weight, const OptTensor& ref_bias,
                                            double temperature, bool want_kl, bool want_entropy,
                                            bool want_grad_norm, int64_t topk, int64_t chunk);
std::vector<at::Tensor> token_stats_backward(const OptTensor& grad_logp, const OptTensor& grad_kl,
                                             const OptTensor& grad_entropy, const at::Tensor& hidden,
                                             const at::Tensor& weight, const OptTensor& bias,
                                             const at::Tensor& targets, const OptTensor& ref_hidden,
                                             const OptTensor& ref_weight, const OptTensor& ref_bias,
                                             const at::Tensor& lse, const OptTensor& ref_lse, const OptTensor& kl,
                                             const OptTensor& entropy, const OptTensor& cand_idx,
                                             double temperature, bool need_dh, bool need_dw, bool need_db,
                                             int64_t chunk);
std::vector<at::Tensor> grpo_forward_grad(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                                          const at::Tensor& targets, const OptTensor& old_logp, const at::Tensor& adv,
                                          const at::Tensor& agg_w, const OptTensor& is_w, const OptTensor& ref_logp,
                                          double clip_low, double clip_high, double clip_c, double kl_coeff,
                                          double temperature, bool need_dh, bool need_dw, bool need_db,
                                          int64_t chunk);
at::Tensor grpo_dloss_dlogp(const at::Tensor& logp, const OptTensor& old_logp, const at::Tensor& adv,
                            const at::Tensor& agg_w, const OptTensor& is_w, const OptTensor& ref_logp,
                            double clip_low, double clip_high, double clip_c, double kl_coeff);

// epilogue.cpp
std::vector<at::Tensor> vimpo_epilogue_scan(const at::Tensor& logp, const at::Tensor& ref, const OptTensor& kl,
                                            const at::Tensor& mask, double beta, double lam, int64_t kl_estimator);
std::vector<at::Tensor> vimpo_epilogue_tokens(const at::Tensor& logp, const at::Tensor& ref,
                                              const OptTensor& old_logp, const OptTensor& is_w,
                                              const at::Tensor& mask, const at::Tensor& adv_raw,
                                              const at::Tensor& agg_w, const at::Tensor& dloss_dseq, double beta,
                                              int64_t kl_estimator, bool detach_kl, bool whiten, double adv_mean,
                                              double adv_rstd, double actor_coeff, double clip_low,
                                              double clip_high, double clip_c, bool want_g_kl);
}  // namespace vimpo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "vimpo_kernels compiled backends (C++ CPU, optional CUDA)";
  m.def("built_with_cuda", &vimpo::built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("token_stats_forward", &vimpo::token_stats_forward,
        "Chunked token statistics [logp, lse (fp64), ref_logp, ref_lse (fp64), kl, entropy, cand_idx, "
        "logit_grad_norm] (None where not computed); topk > 0 with want_kl: the candidate-set KL over the topk "
        "largest policy logits",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("ref_hidden"),
        py::arg("ref_weight"), py::arg("ref_bias"), py::arg("temperature"), py::arg("want_kl"),
        py::arg("want_entropy"), py::arg("want_grad_norm") = false, py::arg("topk") = 0, py::arg("chunk_rows") = 0);
  m.def("token_stats_backward", &vimpo::token_stats_backward,
        "Recompute the logits chunk by chunk; returns [d_hidden, d_weight, d_bias] (None where not asked)",
        py::arg("grad_logp"), py::arg("grad_kl"), py::arg("grad_entropy"), py::arg("hidden"), py::arg("weight"),
        py::arg("bias"), py::arg("targets"), py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("ref_bias"),
        py::arg("lse"), py::arg("ref_lse"), py::arg("kl"), py::arg("entropy"), py::arg("cand_idx"), py::arg("temperature"),
        py::arg("need_dh"), py::arg("need_dw"), py::arg("need_db"), py::arg("chunk_rows") = 0);
  m.def("grpo_forward_grad", &vimpo::grpo_forward_grad,
        "GRPO-family loss gradients computed in the forward chunk loop: [logp, lse, dloss_dlogp, d_hidden, "
        "d_weight, d_bias]",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("old_logp"),
        py::arg("adv"), py::arg("agg_w"), py::arg("is_w"), py::arg("ref_logp"), py::arg("clip_low"),
        py::arg("clip_high"), py::arg("clip_c"), py::arg("kl_coeff"), py::arg("temperature"), py::arg("need_dh"),
        py::arg("need_dw"), py::arg("need_db"), py::arg("chunk_rows") = 0);
  m.def("grpo_dloss_dlogp", &vimpo::grpo_dloss_dlogp,
        "The GRPO-family per-token d loss / d logp (the coefficient grpo_forward_grad uses), on CPU",
        py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("agg_w"), py::arg("is_w"),
        py::arg("ref_logp"), py::arg("clip_low"), py::arg("clip_high"), py::arg("clip_c"), py::arg("kl_coeff"));
  m.def("vimpo_epilogue_scan", &vimpo::vimpo_epilogue_scan,
        "VIMPO epilogue pass 1 (fp64, (B, T)): [u, adv_raw, seq_value]", py::arg("logp"), py::arg("ref_logp"),
        py::arg("token_kl"), py::arg("mask"), py::arg("beta"), py::arg("lam"), py::arg("kl_estimator"));
  m.def("vimpo_epilogue_tokens", &vimpo::vimpo_epilogue_tokens,
        "VIMPO epilogue pass 2 (fp64, (B, T)): [adv, g_logp, g_kl, sums (B, 4): loss, clip, clip_lower, "
        "-log_ratio]",
        py::arg("logp"), py::arg("ref_logp"), py::arg("old_logp"), py::arg("is_w"), py::arg("mask"),
        py::arg("adv_raw"), py::arg("agg_w"), py::arg("dloss_dseq"), py::arg("beta"), py::arg("kl_estimator"),
        py::arg("detach_kl"), py::arg("whiten"), py::arg("adv_mean"), py::arg("adv_rstd"), py::arg("actor_coeff"),
        py::arg("clip_low"), py::arg("clip_high"), py::arg("clip_c"), py::arg("want_g_kl"));
}
