// CUDA kernels of the VIMPO sequence epilogue: one thread per sequence runs the same
// per-sequence functions as the CPU (epilogue_math.h). The epilogue is O(B*T) against the
// O(B*T*V*H) GEMMs around it; a sequence's reverse scan is inherently serial in T, so a
// thread per sequence is the simple layout (B >= a few hundred fills an SM's worth of warps).
//
// Status: compiled and linked in CI (.ci/build_cuda.sh); not yet run on a GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../epilogue_args.h"

namespace vimpo {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__global__ void scan_kernel(ScanArgs a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.B) return;
  const int64_t o = i * a.T;
  a.seq_value[i] = scan_sequence(a.logp + o, a.ref + o, a.kl ? a.kl + o : nullptr, a.m + o, a.T, a.p, a.u + o,
                                 a.adv_raw + o);
}

__global__ void tokens_kernel(TokenArgs a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.B) return;
  const int64_t o = i * a.T;
  const TokenSums s = token_pass(a.logp + o, a.ref + o, a.old ? a.old + o : nullptr, a.is_w ? a.is_w + o : nullptr,
                                 a.m + o, a.adv_raw + o, a.agg_w + o, a.T, a.dloss_dseq[i], a.p, a.batch, a.adv + o,
                                 a.g_logp + o, a.g_kl ? a.g_kl + o : nullptr);
  double* out = a.sums + 4 * i;
  out[0] = s.loss;
  out[1] = s.clip;
  out[2] = s.clip_lower;
  out[3] = s.neg_log_ratio;
}

unsigned blocks_for(int64_t B) { return static_cast<unsigned>((B + kThreads - 1) / kThreads); }

}  // namespace

void epilogue_scan(const ScanArgs& a) {
  if (a.B == 0) return;
  scan_kernel<<<blocks_for(a.B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void epilogue_tokens(const TokenArgs& a) {
  if (a.B == 0) return;
  tokens_kernel<<<blocks_for(a.B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace vimpo
