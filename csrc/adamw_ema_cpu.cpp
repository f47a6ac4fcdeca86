// CPU kernel of coredi_native::adamw_ema_step_: the tensors are cut into chunks that at::parallel_for spreads over
// the threads; each chunk is one tight loop over contiguous memory that the compiler vectorizes for fp32.
#include "adamw_ema.h"
#include "adamw_ema_math.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace coredi_native {

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task: ~0.5-1 MB of traffic, well above the task cost

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename P, typename S, bool kMaster, bool kEma>
void update_range(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                  S* __restrict__ exp_avg_sq, float* __restrict__ ema, float* __restrict__ master, int64_t begin,
                  int64_t end, const ElementScalars s) {
  for (int64_t j = begin; j < end; ++j) {
    float w = kMaster ? master[j] : static_cast<float>(param[j]);
    float m = static_cast<float>(exp_avg[j]);
    float v = static_cast<float>(exp_avg_sq[j]);
    adamw_update(w, static_cast<float>(grad[j]), m, v, s);
    exp_avg[j] = static_cast<S>(m);
    exp_avg_sq[j] = static_cast<S>(v);
    const P stored = static_cast<P>(w);
    param[j] = stored;
    if constexpr (kMaster) master[j] = w;
    if constexpr (kEma) ema[j] = ema_update(ema[j], kMaster ? w : static_cast<float>(stored), s);
  }
}

template <typename P, typename S, bool kMaster, bool kEma>
void run_chunks(const std::vector<Chunk>& chunks, at::TensorList params, at::TensorList grads,
                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
                const std::vector<ElementScalars>& scalars) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& k = chunks[c];
      const int64_t i = k.tensor;
      update_range<P, S, kMaster, kEma>(
          params[i].data_ptr<P>(), grads[i].const_data_ptr<P>(), exp_avgs[i].data_ptr<S>(),
          exp_avg_sqs[i].data_ptr<S>(), kEma ? emas[i].data_ptr<float>() : nullptr,
          kMaster ? masters[i].data_ptr<float>() : nullptr, k.begin, k.end, scalars[i]);
    }
  });
}

template <typename P, typename S>
void run_typed(const std::vector<Chunk>& chunks, at::TensorList params, at::TensorList grads,
               at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
               const std::vector<ElementScalars>& scalars) {
  const bool has_master = !masters.empty();
  const bool has_ema = !emas.empty();
  if (has_master && has_ema) {
    run_chunks<P, S, true, true>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
  } else if (has_master) {
    run_chunks<P, S, true, false>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
  } else if (has_ema) {
    run_chunks<P, S, false, true>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
  } else {
    run_chunks<P, S, false, false>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
  }
}

}  // namespace

void adamw_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
                        c10::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                        double weight_decay, double ema_decay) {
  const AdamWEMAHyper h{lr, beta1, beta2, eps, weight_decay, ema_decay};
  check_adamw_ema_inputs(params, grads, exp_avgs, exp_avg_sqs, emas, masters, steps, h, c10::DeviceType::CPU);
  if (params.empty()) return;

  std::vector<ElementScalars> scalars(params.size());
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < params.size(); ++i) {
    double step_size, bc2_sqrt;
    bias_corrections(h, steps[i], &step_size, &bc2_sqrt);
    scalars[i] = ElementScalars{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                                static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                                static_cast<float>(step_size), static_cast<float>(bc2_sqrt), static_cast<float>(eps),
                                static_cast<float>(1.0 - ema_decay)};
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      chunks.push_back(Chunk{static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
    }
  }

  const bool fp32_state = exp_avgs[0].scalar_type() == at::kFloat;
  switch (params[0].scalar_type()) {
    case at::kFloat:
      run_typed<float, float>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
      break;
    case at::kBFloat16:
      if (fp32_state) {
        run_typed<c10::BFloat16, float>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
      } else {
        run_typed<c10::BFloat16, c10::BFloat16>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
      }
      break;
    case at::kHalf:
      if (fp32_state) {
        run_typed<c10::Half, float>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
      } else {
        run_typed<c10::Half, c10::Half>(chunks, params, grads, exp_avgs, exp_avg_sqs, emas, masters, scalars);
      }
      break;
    default:
      TORCH_CHECK(false, "adamw_ema_step_: unsupported param dtype ", params[0].scalar_type());
  }
}

}  // namespace coredi_native
