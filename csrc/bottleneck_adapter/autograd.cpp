// Autograd of bottleneck_adapter at the Autograd dispatch key (C++, as for lora_linear: the
// Python register_autograd path costs more per call than a small adapter's whole forward).
// The backward is the separate op bottleneck_adapter_backward, with its own kernels and fake.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace eefast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const OptTensor& residual,
                                        const Tensor& down_weight, const OptTensor& down_bias,
                                        const Tensor& up_weight, const OptTensor& up_bias,
                                        const Tensor& scale, c10::string_view activation) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eefast::bottleneck_adapter", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                            const OptTensor&, const Tensor&, const OptTensor&,
                                            const Tensor&, c10::string_view)>();
  return op.call(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation);
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Grads call_backward(const Tensor& grad_out, const Tensor& x, const Tensor& down_weight,
                    const Tensor& up_weight, const OptTensor& up_bias, const Tensor& z,
                    const Tensor& scale, c10::string_view activation, bool residual_is_x,
                    bool needs_grad_x, bool needs_grad_scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eefast::bottleneck_adapter_backward", "")
          .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const OptTensor&, const Tensor&, const Tensor&, c10::string_view, bool,
                       bool, bool)>();
  return op.call(grad_out, x, down_weight, up_weight, up_bias, z, scale, activation,
                 residual_is_x, needs_grad_x, needs_grad_scale);
}

class BottleneckAdapterFunction : public torch::autograd::Function<BottleneckAdapterFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual,
                               const Tensor& down_weight, const OptTensor& down_bias,
                               const Tensor& up_weight, const OptTensor& up_bias,
                               const Tensor& scale, c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, z] =
        call_forward(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation);
    // The backward needs x and the bottleneck pre-activation z; never [tokens, out] tensors.
    ctx->save_for_backward({x, down_weight, up_weight, up_bias ? *up_bias : Tensor(), z, scale});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["residual_is_x"] = !residual.has_value();
    // needs_input_grad() indexes autograd edges, which absent optionals lack: record by name.
    ctx->saved_data["needs_x"] = x.requires_grad();
    ctx->saved_data["needs_residual"] = residual && residual->requires_grad();
    ctx->saved_data["needs_down_bias"] = down_bias && down_bias->requires_grad();
    ctx->saved_data["needs_up_bias"] = up_bias && up_bias->requires_grad();
    ctx->saved_data["needs_scale"] = scale.requires_grad();
    ctx->mark_non_differentiable({z});
    return {out, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto flag = [ctx](const char* name) { return ctx->saved_data[name].toBool(); };
    const Tensor grad_out = grads[0].contiguous();
    const OptTensor up_bias = saved[3].defined() ? OptTensor(saved[3]) : std::nullopt;
    auto [grad_x, grad_down, grad_down_bias, grad_up, grad_up_bias, grad_scale] = call_backward(
        grad_out, saved[0], saved[1], saved[2], up_bias, saved[4], saved[5],
        ctx->saved_data["activation"].toStringRef(), flag("residual_is_x"), flag("needs_x"),
        flag("needs_scale"));
    return {flag("needs_x") ? grad_x : Tensor(),
            flag("needs_residual") ? grad_out : Tensor(),
            grad_down,
            flag("needs_down_bias") ? grad_down_bias : Tensor(),
            grad_up,
            flag("needs_up_bias") ? grad_up_bias : Tensor(),
            flag("needs_scale") ? grad_scale : Tensor(),
            Tensor()};  // activation
  }
};

std::tuple<Tensor, Tensor> bottleneck_adapter_autograd(const Tensor& x, const OptTensor& residual,
                                                       const Tensor& down_weight,
                                                       const OptTensor& down_bias,
                                                       const Tensor& up_weight,
                                                       const OptTensor& up_bias,
                                                       const Tensor& scale,
                                                       c10::string_view activation) {
  auto out = BottleneckAdapterFunction::apply(x, residual, down_weight, down_bias, up_weight,
                                              up_bias, scale, activation);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, Autograd, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_autograd);
}

}  // namespace eefast
