// CUDA row passes of the chunked log-prob ops (compiled with VIMPO_BUILD_CUDA=1).
//
// Same orchestration as the CPU (logprobs_chunked.cpp: cuBLAS GEMMs through ATen into a
// reused chunk buffer); here the buffer is row-major (rows, V) fp32 (fp64 for fp64 input) and
// one block of 256 threads sweeps one row with coalesced loads: 16-byte float4 loads when the
// row is 16-byte aligned (every row when V % 4 == 0, e.g. V = 151936), a scalar tail
// otherwise. Each thread keeps online sums over its strided share of the row, one exp per
// logit and model (token_math.h `accumulate_entry`), and the block merges them in shared
// memory (`merge_row_sums`). The element math is token_math.h's, the one the CPU tests exercise.
//
// Backward / GRPO passes write d loss / d raw logits either in place (fp32/fp64 path) or, for
// the bf16 gradient GEMMs, as bf16 into a separate (rows, V) buffer: each value is computed in
// fp32 and rounded once, to nearest even (8-byte stores of 4 values). bf16 keeps fp32's
// exponent range, so g * p_j is never flushed the way an fp16 store would flush it below 6e-8;
// fp16 operands therefore take the fp32 gradient path (logprobs_chunked.cpp `Plan`).
//
// Launches go to the current stream of the current device; every op entry point in
// logprobs_chunked.cpp sets the device of its tensors first (device guard), so the current
// device and stream here are the tensors' own.
//
// Status: compiled and linked in CI (.ci/build_cuda.sh); not yet run on a GPU.
// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS
// headers that a bare toolkit (headers of the runtime only) may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "../row_passes.h"

namespace vimpo {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Four consecutive values, stored with one 8-byte (bf16) or 16-byte (fp32) access.
template <class T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <std::size_t Bytes>
__device__ __forceinline__ bool aligned(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) % Bytes) == 0;
}

// Accumulation type: fp32 for fp32, fp64 for fp64 (as on the CPU, up to the fp64 block merge).
template <class T>
__device__ RowSums<T> thread_sums(const T* z, const T* zr, int64_t vocab, T it) {
  RowSums<T> s{T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  const bool has_ref = zr != nullptr;
  int64_t j0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (aligned<16>(z) && (!has_ref || aligned<16>(zr))) {  // uniform across the block (one row)
      const int64_t n4 = vocab / 4;
      const float4* z4 = reinterpret_cast<const float4*>(z);
      const float4* zr4 = reinterpret_cast<const float4*>(zr);
      for (int64_t q = threadIdx.x; q < n4; q += blockDim.x) {
        const float4 v = z4[q];
        const float4 w = has_ref ? zr4[q] : make_float4(0.f, 0.f, 0.f, 0.f);
        accumulate_entry(s, v.x * it, w.x * it, has_ref);
        accumulate_entry(s, v.y * it, w.y * it, has_ref);
        accumulate_entry(s, v.z * it, w.z * it, has_ref);
        accumulate_entry(s, v.w * it, w.w * it, has_ref);
      }
      j0 = n4 * 4;
    }
  }
  for (int64_t j = j0 + threadIdx.x; j < vocab; j += blockDim.x)
    accumulate_entry(s, z[j] * it, has_ref ? zr[j] * it : T(0), has_ref);
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

// out[j] = grad(z[j], zr[j], j) over one row, for every j: float4 loads and 4-wide stores when
// the row pointers allow, else scalar. `out` may alias `z` (in place): each thread reads
// z[j] / zr[j] before it writes out[j], and no other thread touches index j.
template <class T, class Out, class Grad>
__device__ void map_row(const T* z, const T* zr, Out* out, int64_t vocab, Grad grad) {
  int64_t j0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (aligned<16>(z) && (!zr || aligned<16>(zr)) && aligned<4 * sizeof(Out)>(out)) {
      const int64_t n4 = vocab / 4;
      for (int64_t q = threadIdx.x; q < n4; q += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(z)[q];
        const float4 w = zr ? reinterpret_cast<const float4*>(zr)[q] : make_float4(0.f, 0.f, 0.f, 0.f);
        const int64_t j = 4 * q;
        Pack4<Out> o;
        o.v[0] = Out(grad(v.x, w.x, j));
        o.v[1] = Out(grad(v.y, w.y, j + 1));
        o.v[2] = Out(grad(v.z, w.z, j + 2));
        o.v[3] = Out(grad(v.w, w.w, j + 3));
        reinterpret_cast<Pack4<Out>*>(out)[q] = o;
      }
      j0 = n4 * 4;
    }
  }
  for (int64_t j = j0 + threadIdx.x; j < vocab; j += blockDim.x) out[j] = Out(grad(z[j], zr ? zr[j] : T(0), j));
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

// Out = T: in place over the logits; Out = c10::BFloat16: into a.dlogits_bf16.
template <class T, class Out>
__global__ void backward_kernel(BackwardRows<T> a) {
  const int64_t r = blockIdx.x;
  const T* z = a.logits + r * a.vocab;
  const T* zr = a.ref_logits ? a.ref_logits + r * a.vocab : nullptr;
  Out* out;
  if constexpr (std::is_same_v<Out, T>) out = a.logits + r * a.vocab;
  else out = a.dlogits_bf16 + r * a.vocab;
  const T it = a.inv_temp;
  const SplitConst<T> lse = split_const<T>(a.lse[r]);
  const T g = a.grad_logp ? a.grad_logp[r] : T(0);
  const T g_kl = a.grad_kl ? a.grad_kl[r] : T(0);
  const T kl = zr ? a.kl[r] : T(0);
  const SplitConst<T> ref_lse = split_const<T>(zr ? a.ref_lse[r] : 0.0);
  const T g_ent = a.grad_entropy ? a.grad_entropy[r] : T(0);
  const T ent = a.grad_entropy ? a.entropy[r] : T(0);
  const int64_t y = a.targets[r];
  const bool has_ref = zr != nullptr;
  map_row(z, zr, out, a.vocab, [&](T zj, T zrj, int64_t j) {
    const T logp_j = (zj * it - lse.hi) - lse.lo;
    const T logq_j = has_ref ? (zrj * it - ref_lse.hi) - ref_lse.lo : T(0);
    T d = dlogit_entry<T>(exp_nonpos(logp_j), logp_j, logq_j, g, g_kl, kl, g_ent, ent);  // the one exp
    if (j == y) d += g;
    return d * it;
  });
}

template <class T, class Out>
__global__ void grpo_kernel(GrpoRows<T> a) {
  const int64_t r = blockIdx.x;
  const T* z = a.logits + r * a.vocab;
  Out* out;
  if constexpr (std::is_same_v<Out, T>) out = a.logits + r * a.vocab;
  else out = a.dlogits_bf16 + r * a.vocab;
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
  map_row(z, static_cast<const T*>(nullptr), out, a.vocab, [&](T zj, T, int64_t j) {
    T d = -g * exp_nonpos(zj * it - lse);
    if (j == y) d += g;
    return d * it;
  });
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
void backward_rows(const BackwardRows<T>& a) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.dlogits_bf16) return launch(a, backward_kernel<float, c10::BFloat16>);
  }
  TORCH_CHECK(!a.dlogits_bf16, "vimpo: bf16 logit gradients need fp32 logits");
  launch(a, backward_kernel<T, T>);
}

template <class T>
void grpo_rows(const GrpoRows<T>& a) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.dlogits_bf16) return launch(a, grpo_kernel<float, c10::BFloat16>);
  }
  TORCH_CHECK(!a.dlogits_bf16, "vimpo: bf16 logit gradients need fp32 logits");
  launch(a, grpo_kernel<T, T>);
}

template void forward_rows<float>(const ForwardRows<float>&);
template void forward_rows<double>(const ForwardRows<double>&);
template void backward_rows<float>(const BackwardRows<float>&);
template void backward_rows<double>(const BackwardRows<double>&);
template void grpo_rows<float>(const GrpoRows<float>&);
template void grpo_rows<double>(const GrpoRows<double>&);

}  // namespace cuda
}  // namespace vimpo
