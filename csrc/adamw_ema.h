// coredi_native: AdamW + fp32 EMA in one pass over each parameter (declarations shared by the CPU and CUDA parts).
//
// Per element of tensor i (all math in fp32, one rounding at each store):
//
//     w   = master[i] if masters are given, else float(param)
//     w  *= 1 - lr * weight_decay                                   decoupled weight decay (AdamW)
//     m   = m + (1 - beta1) * (g - m)                               first moment
//     v   = beta2 * v + (1 - beta2) * g * g                         second moment
//     w  -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)            bc1 = 1 - beta1^step_i, bc2 = 1 - beta2^step_i
//     store param = w (rounded to the param dtype), master = w, m, v
//     ema = ema + (1 - ema_decay) * (w_stored - ema)                w_stored = master if given, else float(param)
//
// so the EMA follows exactly what the optimizer leaves in the (fp32) weights, reading each weight once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace coredi_native {

// Scalars of one call (one parameter group). Per-tensor scalars (the bias corrections) come from `steps`.
struct AdamWEMAHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double ema_decay;
};

// Per-tensor bias-correction terms, computed in double on the host: step_size = lr / (1 - beta1^step) and
// bc2_sqrt = sqrt(1 - beta2^step).
inline void bias_corrections(const AdamWEMAHyper& h, int64_t step, double* step_size, double* bc2_sqrt) {
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
  *step_size = h.lr / bc1;
  *bc2_sqrt = std::sqrt(bc2);
}

// Validates lengths, devices, dtypes, sizes and layouts of the tensor lists and the scalars; TORCH_CHECK errors name
// the argument. `device_type` is the dispatch key's device (CPU / CUDA).
void check_adamw_ema_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
                            c10::IntArrayRef steps, const AdamWEMAHyper& h, c10::DeviceType device_type);

void adamw_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
                        c10::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                        double weight_decay, double ema_decay);

}  // namespace coredi_native
