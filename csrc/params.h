// The params spec: every scalar and flag of the compiled ops, one struct per op family (the
// flash-attention `Flash_fwd_params` pattern). Tensors stay explicit arguments; the scalars
// travel from Python as ONE packed list of doubles, the fields in declared order, built by the
// frozen dataclass of the same name in vimpo_kernels/params.py (`pack()`).
//
// Each struct lists its fields once, in `fields(visit)`; both `from_packed()` (the reader: the
// length, 0/1 flags and integral integers are checked, with the field named in the error) and
// `names()` walk that list, and the extension exposes the names (`_C.param_names()`) so a test
// holds every dataclass against its struct, name for name and in order
// (tests/kernels/test_params_spec.py).
//
// Adding a scalar: a field in the dataclass, the same member here plus its line in `fields`,
// and its use in the kernel. Nothing between (bindings, custom-op schemas, call signatures)
// changes. The structs are plain data, so the CUDA kernels take them by value. Member defaults
// are placeholders (zero): every field comes from the pack.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "token_math.h"

namespace vimpo {
namespace params_detail {

// One packed value into a field, by the field's type.
inline void read_field(const char*, const char*, double v, double& out) { out = v; }

inline void read_field(const char* spec, const char* name, double v, bool& out) {
  TORCH_CHECK(v == 0.0 || v == 1.0, spec, ".", name, " is a flag: the packed value must be 0 or 1, got ", v);
  out = v != 0.0;
}

inline void read_field(const char* spec, const char* name, double v, int64_t& out) {
  // 2^53: every integer below it is exact in a double.
  TORCH_CHECK(std::isfinite(v) && std::nearbyint(v) == v && std::fabs(v) <= 9007199254740992.0, spec, ".", name,
              " is an integer: the packed value must be integral, got ", v);
  out = static_cast<int64_t>(v);
}

template <class P>
std::vector<std::string> names() {
  std::vector<std::string> out;
  P p;
  p.fields([&](const char* name, auto&) { out.emplace_back(name); });
  return out;
}

template <class P>
P from_packed(const std::vector<double>& packed) {
  P p;
  const std::vector<std::string> expected = names<P>();
  if (packed.size() != expected.size()) {
    std::string list;
    for (const auto& n : expected) list += (list.empty() ? "" : ", ") + n;
    TORCH_CHECK(false, P::kName, ": expected ", expected.size(), " packed values (", list, "), got ", packed.size(),
                "; build them with vimpo_kernels.params.", P::kName, "(...).pack()");
  }
  std::size_t i = 0;
  p.fields([&](const char* name, auto& field) { read_field(P::kName, name, packed[i++], field); });
  return p;
}

}  // namespace params_detail

// The chunked token statistics (logprobs_chunked.cpp): `token_stats_forward` reads temperature,
// the want_* flags, topk and chunk_rows; `token_stats_backward` reads temperature, the need_*
// flags and chunk_rows (the candidate set travels as the forward's cand_idx tensor).
struct TokenStatsParams {
  static constexpr const char* kName = "TokenStatsParams";
  double temperature = 0.0;     // logits of both models are divided by it (> 0)
  bool want_kl = false;         // KL(pi || pi_ref) (needs the reference)
  bool want_entropy = false;    // H(pi)
  bool want_grad_norm = false;  // ||d logp_y / d tempered logits||_2 (adaptive actor coefficient)
  int64_t topk = 0;             // > 0 with want_kl: the candidate-set KL over the topk largest logits
  bool need_dh = false;         // backward: d hidden
  bool need_dw = false;         // backward: d weight
  bool need_db = false;         // backward: d bias (when there is a bias)
  int64_t chunk_rows = 0;       // rows per chunk; 0 = the backend's own choice

  template <class Visit>
  void fields(Visit&& f) {
    f("temperature", temperature);
    f("want_kl", want_kl);
    f("want_entropy", want_entropy);
    f("want_grad_norm", want_grad_norm);
    f("topk", topk);
    f("need_dh", need_dh);
    f("need_dw", need_dw);
    f("need_db", need_db);
    f("chunk_rows", chunk_rows);
  }
  static TokenStatsParams from_packed(const std::vector<double>& v) {
    return params_detail::from_packed<TokenStatsParams>(v);
  }
  static std::vector<std::string> names() { return params_detail::names<TokenStatsParams>(); }
};

// The GRPO-family forward-gradient ops (logprobs_chunked.cpp): `grpo_forward_grad` reads every
// field, `grpo_dloss_dlogp` the four PPO constants.
struct GrpoParams {
  static constexpr const char* kName = "GrpoParams";
  double clip_low = 0.0;   // ratio floor 1 - clip_low
  double clip_high = 0.0;  // ratio ceiling 1 + clip_high
  double clip_c = 0.0;     // dual-clip constant (> 1)
  double kl_coeff = 0.0;   // k3 KL penalty weight (> 0 needs ref_logp)
  double temperature = 0.0;
  bool need_dh = false;
  bool need_dw = false;
  bool need_db = false;
  int64_t chunk_rows = 0;

  template <class Visit>
  void fields(Visit&& f) {
    f("clip_low", clip_low);
    f("clip_high", clip_high);
    f("clip_c", clip_c);
    f("kl_coeff", kl_coeff);
    f("temperature", temperature);
    f("need_dh", need_dh);
    f("need_dw", need_dw);
    f("need_db", need_db);
    f("chunk_rows", chunk_rows);
  }
  static GrpoParams from_packed(const std::vector<double>& v) { return params_detail::from_packed<GrpoParams>(v); }
  static std::vector<std::string> names() { return params_detail::names<GrpoParams>(); }

  // The per-token constants of token_math.h `ppo_dloss_dlogp`.
  PPOParams ppo() const { return PPOParams{clip_low, clip_high, clip_c, kl_coeff}; }
};

// The VIMPO sequence epilogue (epilogue_math.h), both passes and both devices (the CUDA
// kernels take it by value): `vimpo_epilogue_scan` reads beta, lam and kl_estimator;
// `vimpo_epilogue_tokens` every field but lam. The whitening statistics and the actor
// coefficient are batch-level numbers formed between the two passes: they travel as a device
// tensor (`EpilogueBatch`), not here, so forming them never reads a device value on the host.
struct EpilogueParams {
  static constexpr const char* kName = "EpilogueParams";
  double beta = 0.0;          // the log-ratio scale of the token term
  double lam = 0.0;           // lambda of the reverse scan
  int64_t kl_estimator = 0;   // KlEstimator: 0 = the given token KL, 2 = k2, 3 = k3
  bool detach_kl = false;     // no gradient through the KL term
  bool whiten = false;        // adv = (adv_raw - adv_mean) * adv_rstd on valid tokens
  double clip_low = 0.0;
  double clip_high = 0.0;
  double clip_c = 0.0;
  bool want_g_kl = false;     // also return d loss / d token_kl

  template <class Visit>
  void fields(Visit&& f) {
    f("beta", beta);
    f("lam", lam);
    f("kl_estimator", kl_estimator);
    f("detach_kl", detach_kl);
    f("whiten", whiten);
    f("clip_low", clip_low);
    f("clip_high", clip_high);
    f("clip_c", clip_c);
    f("want_g_kl", want_g_kl);
  }
  static EpilogueParams from_packed(const std::vector<double>& v) {
    return params_detail::from_packed<EpilogueParams>(v);
  }
  static std::vector<std::string> names() { return params_detail::names<EpilogueParams>(); }

  // The PPO constants of the token pass (no KL penalty: the KL enters through the value loss).
  VIMPO_HD PPOParams ppo() const { return PPOParams{clip_low, clip_high, clip_c, 0.0}; }
};

// The batch-level numbers of `vimpo_epilogue_tokens`, a float64 (3,) tensor on the data's
// device, read by the kernels in place (vimpo_kernels/params.py EPILOGUE_BATCH mirrors it).
enum EpilogueBatch : int { kAdvMean = 0, kAdvRstd = 1, kActorCoeff = 2, kEpilogueBatchSize = 3 };

}  // namespace vimpo
