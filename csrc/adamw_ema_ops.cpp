// The op schema (registered once, here) and the input checks shared by the CPU and CUDA kernels.
//
//     torch.ops.coredi_native.adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, emas, masters, steps,
//                                             lr, beta1, beta2, eps, weight_decay, ema_decay)
//
// Lists: params (fp32 | bf16 | fp16), grads (the param dtype), exp_avgs / exp_avg_sqs (fp32 or the param dtype,
// both the same), emas (fp32; empty = no EMA), masters (fp32; empty = no master copy), steps (the step number of
// each tensor after this update, >= 1). All tensors of a call live on one device and are contiguous.
#include "adamw_ema.h"

#include <torch/library.h>

#include <string>

#ifndef COREDI_TORCH_VERSION  // set by CMakeLists.txt
#define COREDI_TORCH_VERSION "unknown"
#endif

namespace coredi_native {

namespace {

bool is_float_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void check_adamw_ema_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList masters,
                            c10::IntArrayRef steps, const AdamWEMAHyper& h, c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "adamw_ema_step_: grads has ", grads.size(), " tensors, params has ", n);
  TORCH_CHECK(exp_avgs.size() == n, "adamw_ema_step_: exp_avgs has ", exp_avgs.size(), " tensors, params has ", n);
  TORCH_CHECK(exp_avg_sqs.size() == n, "adamw_ema_step_: exp_avg_sqs has ", exp_avg_sqs.size(),
              " tensors, params has ", n);
  TORCH_CHECK(emas.empty() || emas.size() == n, "adamw_ema_step_: emas must be empty or have ", n,
              " tensors, got ", emas.size());
  TORCH_CHECK(masters.empty() || masters.size() == n, "adamw_ema_step_: masters must be empty or have ", n,
              " tensors, got ", masters.size());
  TORCH_CHECK(steps.size() == n, "adamw_ema_step_: steps has ", steps.size(), " entries, params has ", n);
  TORCH_CHECK(h.lr >= 0.0, "adamw_ema_step_: lr must be >= 0, got ", h.lr);
  TORCH_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0, "adamw_ema_step_: beta1 must be in [0, 1), got ", h.beta1);
  TORCH_CHECK(h.beta2 >= 0.0 && h.beta2 < 1.0, "adamw_ema_step_: beta2 must be in [0, 1), got ", h.beta2);
  TORCH_CHECK(h.eps >= 0.0, "adamw_ema_step_: eps must be >= 0, got ", h.eps);
  TORCH_CHECK(h.weight_decay >= 0.0, "adamw_ema_step_: weight_decay must be >= 0, got ", h.weight_decay);
  TORCH_CHECK(h.ema_decay >= 0.0 && h.ema_decay <= 1.0, "adamw_ema_step_: ema_decay must be in [0, 1], got ",
              h.ema_decay);
  if (n == 0) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, "adamw_ema_step_: params[0] is on ", device, ", this kernel is for ",
              device_type);

  auto check_tensor = [&](const at::Tensor& t, const char* name, size_t i, const at::Tensor& p) {
    TORCH_CHECK(t.defined(), "adamw_ema_step_: ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == device, "adamw_ema_step_: ", name, "[", i, "] is on ", t.device(),
                ", params[0] is on ", device, " (one device per call)");
    TORCH_CHECK(t.numel() == p.numel(), "adamw_ema_step_: ", name, "[", i, "] has ", t.numel(),
                " elements, params[", i, "] has ", p.numel());
    TORCH_CHECK(t.is_contiguous(), "adamw_ema_step_: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(!t.is_sparse(), "adamw_ema_step_: ", name, "[", i, "] is sparse (AdamW needs dense tensors)");
  };

  const at::ScalarType param_dtype = params[0].scalar_type();
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  TORCH_CHECK(is_float_param_dtype(param_dtype), "adamw_ema_step_: params must be float32, bfloat16 or float16, ",
              "got ", param_dtype);
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == param_dtype,
              "adamw_ema_step_: exp_avgs must be float32 or the params' dtype (", param_dtype, "), got ", state_dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_tensor(p, "params", i, p);
    TORCH_CHECK(p.scalar_type() == param_dtype, "adamw_ema_step_: params[", i, "] is ", p.scalar_type(),
                ", params[0] is ", param_dtype, " (one dtype per call)");
    check_tensor(grads[i], "grads", i, p);
    TORCH_CHECK(grads[i].scalar_type() == param_dtype, "adamw_ema_step_: grads[", i, "] is ",
                grads[i].scalar_type(), ", expected the params' dtype ", param_dtype);
    check_tensor(exp_avgs[i], "exp_avgs", i, p);
    check_tensor(exp_avg_sqs[i], "exp_avg_sqs", i, p);
    TORCH_CHECK(exp_avgs[i].scalar_type() == state_dtype && exp_avg_sqs[i].scalar_type() == state_dtype,
                "adamw_ema_step_: exp_avgs[", i, "] and exp_avg_sqs[", i, "] must both be ", state_dtype);
    if (!emas.empty()) {
      check_tensor(emas[i], "emas", i, p);
      TORCH_CHECK(emas[i].scalar_type() == at::kFloat, "adamw_ema_step_: emas[", i, "] must be float32, got ",
                  emas[i].scalar_type());
    }
    if (!masters.empty()) {
      check_tensor(masters[i], "masters", i, p);
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "adamw_ema_step_: masters[", i,
                  "] must be float32, got ", masters[i].scalar_type());
    }
    TORCH_CHECK(steps[i] >= 1, "adamw_ema_step_: steps[", i, "] must be >= 1 (the step after this update), got ",
                steps[i]);
  }
}

std::string build_info() {
#ifdef COREDI_WITH_CUDA_KERNELS
  const char* devices = "cpu,cuda";
#else
  const char* devices = "cpu";
#endif
  return std::string("torch=") + COREDI_TORCH_VERSION + ";devices=" + devices;
}

}  // namespace coredi_native

TORCH_LIBRARY(coredi_native, m) {
  // "torch=<version built against>;devices=cpu[,cuda]": what this build of the library can run.
  m.def("build_info() -> str", &coredi_native::build_info);
  m.def(
      "adamw_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] emas, Tensor(e!)[] masters, int[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float ema_decay) -> ()");
}

TORCH_LIBRARY_IMPL(coredi_native, CPU, m) {
  m.impl("adamw_ema_step_", &coredi_native::adamw_ema_step_cpu);
}
