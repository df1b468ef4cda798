// Python bindings of vimpo_kernels._C. The ops themselves live in one file per op.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "params.h"

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
                                            const TokenStatsParams& p);
std::vector<at::Tensor> token_stats_backward(const OptTensor& grad_logp, const OptTensor& grad_kl,
                                             const OptTensor& grad_entropy, const at::Tensor& hidden,
                                             const at::Tensor& weight, const OptTensor& bias,
                                             const at::Tensor& targets, const OptTensor& ref_hidden,
                                             const OptTensor& ref_weight, const OptTensor& ref_bias,
                                             const at::Tensor& lse, const OptTensor& ref_lse, const OptTensor& kl,
                                             const OptTensor& entropy, const OptTensor& cand_idx,
                                             const TokenStatsParams& p);
std::vector<at::Tensor> grpo_forward_grad(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                                          const at::Tensor& targets, const OptTensor& old_logp, const at::Tensor& adv,
                                          const at::Tensor& agg_w, const OptTensor& is_w, const OptTensor& ref_logp,
                                          const GrpoParams& p);
at::Tensor grpo_dloss_dlogp(const at::Tensor& logp, const OptTensor& old_logp, const at::Tensor& adv,
                            const at::Tensor& agg_w, const OptTensor& is_w, const OptTensor& ref_logp,
                            const GrpoParams& p);

// epilogue.cpp
std::vector<at::Tensor> vimpo_epilogue_scan(const at::Tensor& logp, const at::Tensor& ref, const OptTensor& kl,
                                            const at::Tensor& mask, const EpilogueParams& p);
std::vector<at::Tensor> vimpo_epilogue_tokens(const at::Tensor& logp, const at::Tensor& ref,
                                              const OptTensor& old_logp, const OptTensor& is_w,
                                              const at::Tensor& mask, const at::Tensor& adv_raw,
                                              const at::Tensor& agg_w, const at::Tensor& dloss_dseq,
                                              const at::Tensor& batch, const EpilogueParams& p);

namespace {

using Packed = std::vector<double>;

// The params spec to Python: {struct: [field names in declared order]} and, for the spec test,
// a pack read back by the struct's own `from_packed` as {field: value}.
template <class P>
pybind11::dict unpacked(const Packed& packed) {
  P p = P::from_packed(packed);
  pybind11::dict out;
  p.fields([&](const char* name, auto& field) { out[name] = field; });
  return out;
}

pybind11::dict param_names() {
  pybind11::dict out;
  out[TokenStatsParams::kName] = TokenStatsParams::names();
  out[GrpoParams::kName] = GrpoParams::names();
  out[EpilogueParams::kName] = EpilogueParams::names();
  return out;
}

pybind11::dict unpack_params(const std::string& spec, const Packed& packed) {
  if (spec == TokenStatsParams::kName) return unpacked<TokenStatsParams>(packed);
  if (spec == GrpoParams::kName) return unpacked<GrpoParams>(packed);
  TORCH_CHECK(spec == EpilogueParams::kName, "unpack_params: no params struct named '", spec,
              "' (see param_names())");
  return unpacked<EpilogueParams>(packed);
}

}  // namespace
}  // namespace vimpo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "vimpo_kernels compiled backends (C++ CPU, optional CUDA)";
  m.def("built_with_cuda", &vimpo::built_with_cuda, "True when the CUDA kernels were compiled in");
  // Every scalar and flag of an op travels in `params`: a list of floats packed by the dataclass
  // of the same name in vimpo_kernels/params.py (csrc/params.h reads it back).
  m.def("param_names", &vimpo::param_names,
        "The params spec: {struct name: [field names in declared order]} (csrc/params.h)");
  m.def("unpack_params", &vimpo::unpack_params,
        "Read a packed list back through the named struct's from_packed: {field: value}; raises on a wrong "
        "length, a flag not 0/1 or a non-integral integer",
        py::arg("spec"), py::arg("params"));
  m.def(
      "token_stats_forward",
      [](const at::Tensor& hidden, const at::Tensor& weight, const vimpo::OptTensor& bias, const at::Tensor& targets,
         const vimpo::OptTensor& ref_hidden, const vimpo::OptTensor& ref_weight, const vimpo::OptTensor& ref_bias,
         const vimpo::Packed& params) {
        return vimpo::token_stats_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                          vimpo::TokenStatsParams::from_packed(params));
      },
      "Chunked token statistics [logp, lse (fp64), ref_logp, ref_lse (fp64), kl, entropy, cand_idx, "
      "logit_grad_norm] (None where not computed); params: TokenStatsParams (temperature, want_*, topk > 0 with "
      "want_kl: the candidate-set KL over the topk largest policy logits, chunk_rows)",
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("ref_hidden"),
      py::arg("ref_weight"), py::arg("ref_bias"), py::arg("params"));
  m.def(
      "token_stats_backward",
      [](const vimpo::OptTensor& grad_logp, const vimpo::OptTensor& grad_kl, const vimpo::OptTensor& grad_entropy,
         const at::Tensor& hidden, const at::Tensor& weight, const vimpo::OptTensor& bias, const at::Tensor& targets,
         const vimpo::OptTensor& ref_hidden, const vimpo::OptTensor& ref_weight, const vimpo::OptTensor& ref_bias,
         const at::Tensor& lse, const vimpo::OptTensor& ref_lse, const vimpo::OptTensor& kl,
         const vimpo::OptTensor& entropy, const vimpo::OptTensor& cand_idx, const vimpo::Packed& params) {
        return vimpo::token_stats_backward(grad_logp, grad_kl, grad_entropy, hidden, weight, bias, targets,
                                           ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, entropy, cand_idx,
                                           vimpo::TokenStatsParams::from_packed(params));
      },
      "Recompute the logits chunk by chunk; returns [d_hidden, d_weight, d_bias] (None where not asked); params: "
      "TokenStatsParams (temperature, need_*, chunk_rows)",
      py::arg("grad_logp"), py::arg("grad_kl"), py::arg("grad_entropy"), py::arg("hidden"), py::arg("weight"),
      py::arg("bias"), py::arg("targets"), py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("ref_bias"),
      py::arg("lse"), py::arg("ref_lse"), py::arg("kl"), py::arg("entropy"), py::arg("cand_idx"), py::arg("params"));
  m.def(
      "grpo_forward_grad",
      [](const at::Tensor& hidden, const at::Tensor& weight, const vimpo::OptTensor& bias, const at::Tensor& targets,
         const vimpo::OptTensor& old_logp, const at::Tensor& adv, const at::Tensor& agg_w,
         const vimpo::OptTensor& is_w, const vimpo::OptTensor& ref_logp, const vimpo::Packed& params) {
        return vimpo::grpo_forward_grad(hidden, weight, bias, targets, old_logp, adv, agg_w, is_w, ref_logp,
                                        vimpo::GrpoParams::from_packed(params));
      },
      "GRPO-family loss gradients computed in the forward chunk loop: [logp, lse, dloss_dlogp, d_hidden, "
      "d_weight, d_bias]; params: GrpoParams",
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("old_logp"),
      py::arg("adv"), py::arg("agg_w"), py::arg("is_w"), py::arg("ref_logp"), py::arg("params"));
  m.def(
      "grpo_dloss_dlogp",
      [](const at::Tensor& logp, const vimpo::OptTensor& old_logp, const at::Tensor& adv, const at::Tensor& agg_w,
         const vimpo::OptTensor& is_w, const vimpo::OptTensor& ref_logp, const vimpo::Packed& params) {
        return vimpo::grpo_dloss_dlogp(logp, old_logp, adv, agg_w, is_w, ref_logp,
                                       vimpo::GrpoParams::from_packed(params));
      },
      "The GRPO-family per-token d loss / d logp (the coefficient grpo_forward_grad uses), on CPU; params: "
      "GrpoParams (its PPO constants)",
      py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("agg_w"), py::arg("is_w"), py::arg("ref_logp"),
      py::arg("params"));
  m.def(
      "vimpo_epilogue_scan",
      [](const at::Tensor& logp, const at::Tensor& ref, const vimpo::OptTensor& kl, const at::Tensor& mask,
         const vimpo::Packed& params) {
        return vimpo::vimpo_epilogue_scan(logp, ref, kl, mask, vimpo::EpilogueParams::from_packed(params));
      },
      "VIMPO epilogue pass 1 (fp64, (B, T)): [u, adv_raw, seq_value]; params: EpilogueParams (beta, lam, "
      "kl_estimator)",
      py::arg("logp"), py::arg("ref_logp"), py::arg("token_kl"), py::arg("mask"), py::arg("params"));
  m.def(
      "vimpo_epilogue_tokens",
      [](const at::Tensor& logp, const at::Tensor& ref, const vimpo::OptTensor& old_logp,
         const vimpo::OptTensor& is_w, const at::Tensor& mask, const at::Tensor& adv_raw, const at::Tensor& agg_w,
         const at::Tensor& dloss_dseq, const at::Tensor& batch, const vimpo::Packed& params) {
        return vimpo::vimpo_epilogue_tokens(logp, ref, old_logp, is_w, mask, adv_raw, agg_w, dloss_dseq, batch,
                                            vimpo::EpilogueParams::from_packed(params));
      },
      "VIMPO epilogue pass 2 (fp64, (B, T)): [adv, g_logp, g_kl, sums (B, 4): loss, clip, clip_lower, "
      "-log_ratio]; batch: float64 (3,) [adv_mean, adv_rstd, actor_coeff] on the data's device; params: "
      "EpilogueParams",
      py::arg("logp"), py::arg("ref_logp"), py::arg("old_logp"), py::arg("is_w"), py::arg("mask"),
      py::arg("adv_raw"), py::arg("agg_w"), py::arg("dloss_dseq"), py::arg("batch"), py::arg("params"));
}
