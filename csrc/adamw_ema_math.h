// The per-element AdamW + EMA arithmetic, shared by the CPU loop and the CUDA kernel so both round the same way.
#pragma once

#include <c10/macros/Macros.h>

#include <math.h>

namespace coredi_native {

// Scalars of one tensor's update, in fp32 (computed in double on the host, rounded once).
struct ElementScalars {
  float decay_factor;     // 1 - lr * weight_decay
  float one_minus_beta1;  // 1 - beta1
  float beta2;
  float one_minus_beta2;  // 1 - beta2
  float step_size;        // lr / (1 - beta1^step)
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  float eps;
  float ema_weight;       // 1 - ema_decay
};

// One AdamW update of weight w with gradient g and moments (m, v); all fp32, in place.
C10_HOST_DEVICE inline void adamw_update(float& w, float g, float& m, float& v, const ElementScalars& s) {
  w *= s.decay_factor;
  m += s.one_minus_beta1 * (g - m);  // = lerp(m, g, 1 - beta1), as torch's AdamW computes it
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  w -= s.step_size * m / denom;
}

// ema <- ema + (1 - decay) (target - ema) = lerp(ema, target, 1 - decay), as torch._foreach_lerp_ computes it.
C10_HOST_DEVICE inline float ema_update(float ema, float target, const ElementScalars& s) {
  return ema + s.ema_weight * (target - ema);
}

}  // namespace coredi_native
