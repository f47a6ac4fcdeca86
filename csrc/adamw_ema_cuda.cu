// CUDA kernel of coredi_native::adamw_ema_step_: one multi-tensor launch per ~30 tensors / 320 chunks.
//
// Like torch's `_foreach` / apex `multi_tensor_apply`, the host cuts every tensor into chunks of kChunk elements
// and packs (tensor, chunk) pairs plus the tensors' addresses into the kernel's parameter block (< 4 KB, so no
// host-to-device copy); each thread block updates one chunk. The kernel is bandwidth bound: each element reads
// param, grad, m, v, ema (+ master) once and writes param, m, v, ema (+ master) once, with 4-wide vector loads
// when every address is 16-byte aligned (torch's allocations are).
#include "adamw_ema.h"
#include "adamw_ema_math.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace coredi_native {

namespace {

constexpr int kMaxTensors = 30;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
constexpr int kVec = 4;
constexpr int64_t kChunk = 65536;  // elements per thread block; a multiple of kVec keeps chunk starts aligned

enum List { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kEma, kMaster, kNumLists };

// Everything a launch needs about its tensors, passed by value as the kernel's parameter block.
struct LaunchMeta {
  void* ptrs[kNumLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  float step_size[kMaxTensors];  // lr / (1 - beta1^step) of each tensor
  float bc2_sqrt[kMaxTensors];   // sqrt(1 - beta2^step)
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};
static_assert(sizeof(LaunchMeta) + sizeof(ElementScalars) + 16 <= 4096, "kernel parameters are limited to 4 KB");

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  *reinterpret_cast<Pack<T>*>(p) = x;
}

// Updates one element in registers: w (master or param), m, v, ema; returns the param value to store.
template <typename P>
__device__ __forceinline__ P update_element(float& w, float g, float& m, float& v, float& ema,
                                            const ElementScalars& s, bool has_master, bool has_ema) {
  adamw_update(w, g, m, v, s);
  const P stored = static_cast<P>(w);
  if (has_ema) ema = ema_update(ema, has_master ? w : static_cast<float>(stored), s);
  return stored;
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads)
    adamw_ema_kernel(LaunchMeta meta, ElementScalars base, bool has_master, bool has_ema, bool aligned) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  ElementScalars s = base;
  s.step_size = meta.step_size[t];
  s.bc2_sqrt = meta.bc2_sqrt[t];
  P* param = static_cast<P*>(meta.ptrs[kParam][t]);
  const P* grad = static_cast<const P*>(meta.ptrs[kGrad][t]);
  S* exp_avg = static_cast<S*>(meta.ptrs[kExpAvg][t]);
  S* exp_avg_sq = static_cast<S*>(meta.ptrs[kExpAvgSq][t]);
  float* ema = static_cast<float*>(meta.ptrs[kEma][t]);
  float* master = static_cast<float*>(meta.ptrs[kMaster][t]);

  int64_t scalar_begin = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * kVec; j < vec_end; j += kThreads * kVec) {
      Pack<P> p = load_pack(param + j);
      const Pack<P> g = load_pack(grad + j);
      Pack<S> m = load_pack(exp_avg + j);
      Pack<S> v = load_pack(exp_avg_sq + j);
      Pack<float> e, w;
      if (has_ema) e = load_pack(ema + j);
      if (has_master) w = load_pack(master + j);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float wk = has_master ? w.v[k] : static_cast<float>(p.v[k]);
        float mk = static_cast<float>(m.v[k]);
        float vk = static_cast<float>(v.v[k]);
        float ek = has_ema ? e.v[k] : 0.f;
        p.v[k] = update_element<P>(wk, static_cast<float>(g.v[k]), mk, vk, ek, s, has_master, has_ema);
        m.v[k] = static_cast<S>(mk);
        v.v[k] = static_cast<S>(vk);
        e.v[k] = ek;
        w.v[k] = wk;
      }
      store_pack(param + j, p);
      store_pack(exp_avg + j, m);
      store_pack(exp_avg_sq + j, v);
      if (has_ema) store_pack(ema + j, e);
      if (has_master) store_pack(master + j, w);
    }
    scalar_begin = vec_end;
  }
  for (int64_t j = scalar_begin + threadIdx.x; j < end; j += kThreads) {
    float w = has_master ? master[j] : static_cast<float>(param[j]);
    float m = static_cast<float>(exp_avg[j]);
    float v = static_cast<float>(exp_avg_sq[j]);
    float e = has_ema ? ema[j] : 0.f;
    param[j] = update_element<P>(w, static_cast<float>(grad[j]), m, v, e, s, has_master, has_ema);
    exp_avg[j] = static_cast<S>(m);
    exp_avg_sq[j] = static_cast<S>(v);
    if (has_ema) ema[j] = e;
    if (has_master) master[j] = w;
  }
}

bool is_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename P, typename S>
void launch_all(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList emas, at::TensorList masters, const std::vector<float>& step_size,
                const std::vector<float>& bc2_sqrt, const ElementScalars& base) {
  const bool has_master = !masters.empty();
  const bool has_ema = !emas.empty();
  bool aligned = true;
  for (size_t i = 0; i < params.size(); ++i) {
    aligned = aligned && is_aligned(params[i]) && is_aligned(grads[i]) && is_aligned(exp_avgs[i]) &&
              is_aligned(exp_avg_sqs[i]) && (!has_ema || is_aligned(emas[i])) &&
              (!has_master || is_aligned(masters[i]));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LaunchMeta meta{};
  auto set_slot = [&](int slot, size_t i) {
    meta.ptrs[kParam][slot] = params[i].data_ptr();
    meta.ptrs[kGrad][slot] = grads[i].data_ptr();
    meta.ptrs[kExpAvg][slot] = exp_avgs[i].data_ptr();
    meta.ptrs[kExpAvgSq][slot] = exp_avg_sqs[i].data_ptr();
    meta.ptrs[kEma][slot] = has_ema ? emas[i].data_ptr() : nullptr;
    meta.ptrs[kMaster][slot] = has_master ? masters[i].data_ptr() : nullptr;
    meta.numel[slot] = params[i].numel();
    meta.step_size[slot] = step_size[i];
    meta.bc2_sqrt[slot] = bc2_sqrt[i];
  };
  auto launch = [&](int blocks) {
    adamw_ema_kernel<P, S><<<blocks, kThreads, 0, stream>>>(meta, base, has_master, has_ema, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  int used = 0;    // tensor slots filled
  int blocks = 0;  // (tensor, chunk) pairs queued
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    int slot = used++;
    set_slot(slot, i);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks == kMaxBlocks || (last_chunk && used == kMaxTensors)) {
        launch(blocks);
        blocks = 0;
        if (last_chunk) {
          used = 0;
        } else {  // the rest of this tensor goes to the next launch, in slot 0
          set_slot(0, i);
          slot = 0;
          used = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(blocks);
}

void adamw_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
                         c10::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                         double weight_decay, double ema_decay) {
  const AdamWEMAHyper h{lr, beta1, beta2, eps, weight_decay, ema_decay};
  check_adamw_ema_inputs(params, grads, exp_avgs, exp_avg_sqs, emas, masters, steps, h, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());

  std::vector<float> step_size(params.size()), bc2_sqrt(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    double a, b;
    bias_corrections(h, steps[i], &a, &b);
    step_size[i] = static_cast<float>(a);
    bc2_sqrt[i] = static_cast<float>(b);
  }
  const ElementScalars base{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                            static_cast<float>(beta2), static_cast<float>(1.0 - beta2), 0.f, 1.f,
                            static_cast<float>(eps), static_cast<float>(1.0 - ema_decay)};

  const bool fp32_state = exp_avgs[0].scalar_type() == at::kFloat;
  switch (params[0].scalar_type()) {
    case at::kFloat:
      launch_all<float, float>(params, grads, exp_avgs, exp_avg_sqs, emas, masters, step_size, bc2_sqrt, base);
      break;
    case at::kBFloat16:
      if (fp32_state) {
        launch_all<c10::BFloat16, float>(params, grads, exp_avgs, exp_avg_sqs, emas, masters, step_size, bc2_sqrt,
                                         base);
      } else {
        launch_all<c10::BFloat16, c10::BFloat16>(params, grads, exp_avgs, exp_avg_sqs, emas, masters, step_size,
                                                 bc2_sqrt, base);
      }
      break;
    case at::kHalf:
      if (fp32_state) {
        launch_all<c10::Half, float>(params, grads, exp_avgs, exp_avg_sqs, emas, masters, step_size, bc2_sqrt, base);
      } else {
        launch_all<c10::Half, c10::Half>(params, grads, exp_avgs, exp_avg_sqs, emas, masters, step_size, bc2_sqrt,
                                         base);
      }
      break;
    default:
      TORCH_CHECK(false, "adamw_ema_step_: unsupported param dtype ", params[0].scalar_type());
  }
}

}  // namespace

}  // namespace coredi_native

TORCH_LIBRARY_IMPL(coredi_native, CUDA, m) {
  m.impl("adamw_ema_step_", &coredi_native::adamw_ema_step_cuda);
}
