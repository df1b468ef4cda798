// CUDA row passes of the chunked log-prob ops (compiled with VIMPO_BUILD_CUDA=1).
//
// Same orchestration as the CPU (logprobs_chunked.cpp: cuBLAS GEMMs through ATen into a
// reused chunk buffer); here the buffer is row-major (rows, V) and one block of 256 threads
// sweeps one row with coalesced loads. Each thread keeps online sums over its strided share
// of the row (token_math.h `merge_row_sums`, one exp per logit), the block merges them in
// shared memory. The element math is token_math.h's, the one the CPU tests exercise.
//
// Status: compiled and linked in CI (.ci/build_cuda.sh); not yet run on a GPU.
// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS
// headers that a bare toolkit (headers of the runtime only) may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../row_passes.h"

namespace vimpo {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Accumulation type: fp32 for fp32, fp64 for fp64 (as on the CPU, up to the fp64 block merge).
template <class T>
__device__ RowSums<T> thread_sums(const T* z, const T* zr, int64_t vocab, T it) {
  RowSums<T> s{T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const T l = z[j] * it;
    const T l_ref = zr ? zr[j] * it : T(0);
    // A one-entry part (docs/math.md, "Running sums"): max = the entry itself, so x = 0, e = 1.
    const RowSums<T> one{l, T(1), T(0), l_ref, zr ? T(1) : T(0), T(0), T(1)};
    s = merge_row_sums(s, one);
  }
  return s;
}

template <class T>
__device__ RowSums<T> block_sums(RowSums<T> s) {
  __shared__ RowSums<T> part[kThreads];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) part[threadIdx.x] = merge_row_sums(part[threadIdx.x], part[threadIdx.x + stride]);
    __syncthreads();
  }
  const RowSums<T> total = part[0];
  __syncthreads();
  return total;
}

template <class T>
__global__ void forward_kernel(ForwardRows<T> a) {
  const int64_t r = blockIdx.x;
  const T* z = a.logits + r * a.vocab;
  const T* zr = a.ref_logits ? a.ref_logits + r * a.vocab : nullptr;
  const RowSums<T> s = block_sums(thread_sums(z, zr, a.vocab, a.inv_temp));
  if (threadIdx.x != 0) return;
  const int64_t y = a.targets[r];
  const double lse = double(s.m) + log(double(s.sum_exp));
  a.lse[r] = lse;
  a.logp[r] = T(double(z[y] * a.inv_temp) - lse);
  if (a.entropy) a.entropy[r] = row_entropy(s.sum_exp, s.sum_exp_x);
  if (a.logit_grad_norm)
    a.logit_grad_norm[r] = row_logit_grad_norm(exp_nonpos(z[y] * a.inv_temp - s.m), s.sum_exp, s.sum_exp_sq);
  if (!zr) return;
  const double ref_lse = double(s.m_ref) + log(double(s.sum_exp_ref));
  a.ref_lse[r] = ref_lse;
  a.ref_logp[r] = T(double(zr[y] * a.inv_temp) - ref_lse);
  if (a.kl) a.kl[r] = row_kl(s.sum_exp, s.sum_exp_dx, s.sum_exp_ref);
}

template <class T>
__global__ void backward_kernel(BackwardRows<T> a) {
  const int64_t r = blockIdx.x;
  T* z = a.logits + r * a.vocab;
  const T* zr = a.ref_logits ? a.ref_logits + r * a.vocab : nullptr;
  const T it = a.inv_temp;
  const SplitConst<T> lse = split_const<T>(a.lse[r]);
  const T g = a.grad_logp ? a.grad_logp[r] : T(0);
  const T g_kl = a.grad_kl ? a.grad_kl[r] : T(0);
  const T kl = zr ? a.kl[r] : T(0);
  const SplitConst<T> ref_lse = split_const<T>(zr ? a.ref_lse[r] : 0.0);
  const T g_ent = a.grad_entropy ? a.grad_entropy[r] : T(0);
  const T ent = a.grad_entropy ? a.entropy[r] : T(0);
  const int64_t y = a.targets[r];
  for (int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
    const T logp_j = (z[j] * it - lse.hi) - lse.lo;
    const T logq_j = zr ? (zr[j] * it - ref_lse.hi) - ref_lse.lo : T(0);
    T d = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, logq_j, g, g_kl, kl, g_ent, ent);
    if (j == y) d += g;
    z[j] = d * it;
  }
}

template <class T>
__global__ void grpo_kernel(GrpoRows<T> a) {
  const int64_t r = blockIdx.x;
  T* z = a.logits + r * a.vocab;
  const T it = a.inv_temp;
  const RowSums<T> s = block_sums(thread_sums<T>(z, nullptr, a.vocab, it));
  __shared__ T shared_g;
  const int64_t y = a.targets[r];
  const double lse64 = double(s.m) + log(double(s.sum_exp));
  const T lse = T(lse64);
  if (threadIdx.x == 0) {
    const T logp = T(double(z[y] * it) - lse64);
    const T old = a.old_logp ? a.old_logp[r] : logp;
    const T is_w = a.is_w ? a.is_w[r] : T(1);
    const T ref = a.ref_logp ? a.ref_logp[r] : logp;
    const T g = ppo_dloss_dlogp<T>(logp, old, a.adv[r], a.agg_w[r], is_w, ref, a.params);
    a.logp[r] = logp;
    a.lse[r] = lse64;
    a.dlogp[r] = g;
    shared_g = g;
  }
  __syncthreads();  // z[y] was read by thread 0 above; only now may the row be overwritten
  const T g = shared_g;
  for (int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
    T d = -g * exp_nonpos(z[j] * it - lse);
    if (j == y) d += g;
    z[j] = d * it;
  }
}

template <class Args, class Kernel>
void launch(const Args& a, Kernel kernel) {
  if (a.rows == 0) return;
  kernel<<<static_cast<unsigned>(a.rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <class T>
void forward_rows(const ForwardRows<T>& a) { launch(a, forward_kernel<T>); }
template <class T>
void backward_rows(const BackwardRows<T>& a) { launch(a, backward_kernel<T>); }
template <class T>
void grpo_rows(const GrpoRows<T>& a) { launch(a, grpo_kernel<T>); }

template void forward_rows<float>(const ForwardRows<float>&);
template void forward_rows<double>(const ForwardRows<double>&);
template void backward_rows<float>(const BackwardRows<float>&);
template void backward_rows<double>(const BackwardRows<double>&);
template void grpo_rows<float>(const GrpoRows<float>&);
template void grpo_rows<double>(const GrpoRows<double>&);

}  // namespace cuda
}  // namespace vimpo
