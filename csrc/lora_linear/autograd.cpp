// Autograd of lora_linear, in C++ at the Autograd dispatch key. The backward is the separate
// op lora_linear_backward (so it has its own CPU/CUDA kernels and fake). Done here rather than
// with torch.library.register_autograd because the Python path costs ~0.2 ms per call, which is
// most of a small layer's forward+backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace eefast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias, const Tensor& lora_a,
                                        const Tensor& lora_b, double scaling,
                                        const std::optional<Tensor>& x_lora) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eefast::lora_linear", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                            const std::optional<Tensor>&, const Tensor&,
                                            const Tensor&, double, const std::optional<Tensor>&)>();
  return op.call(x, weight, bias, lora_a, lora_b, scaling, x_lora);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_backward(const Tensor& grad_out,
                                                         const Tensor& weight,
                                                         const Tensor& lora_a,
                                                         const Tensor& lora_b,
                                                         const Tensor& x_lora, const Tensor& xa,
                                                         double scaling, bool needs_grad_x,
                                                         bool split_grad_x) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eefast::lora_linear_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const Tensor&, double, bool, bool)>();
  return op.call(grad_out, weight, lora_a, lora_b, x_lora, xa, scaling, needs_grad_x,
                 split_grad_x);
}

// x_lora, the dropped x, is an optional input that autograd tracks when present.
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& lora_a,
                               const Tensor& lora_b, double scaling,
                               const std::optional<Tensor>& x_lora) {
    TORCH_CHECK(!weight.requires_grad() && !(bias && bias->requires_grad()),
                "lora_linear: weight and bias are frozen and get no gradient; set "
                "requires_grad=False on them (train lora_a and lora_b instead)");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xa] = call_forward(x, weight, bias, lora_a, lora_b, scaling, x_lora);
    // The backward needs the low-rank input (x, or dropout(x)) and xa; never [tokens, out].
    ctx->save_for_backward({x_lora ? *x_lora : x, weight, lora_a, lora_b, xa});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["split"] = x_lora.has_value();
    // needs_input_grad() indexes autograd edges, which absent optionals do not have: record
    // which inputs want a gradient by name instead.
    ctx->saved_data["needs_x"] = x.requires_grad();
    ctx->saved_data["needs_x_lora"] = x_lora && x_lora->requires_grad();
    ctx->saved_data["needs_a"] = lora_a.requires_grad();
    ctx->saved_data["needs_b"] = lora_b.requires_grad();
    ctx->mark_non_differentiable({xa});
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool split = ctx->saved_data["split"].toBool();
    const bool needs_x = ctx->saved_data["needs_x"].toBool();
    const bool needs_x_lora = ctx->saved_data["needs_x_lora"].toBool();
    auto [grad_x, grad_x_lora, grad_a, grad_b] = call_backward(
        grads[0].contiguous(), saved[1], saved[2], saved[3], saved[0], saved[4],
        ctx->saved_data["scaling"].toDouble(), needs_x || needs_x_lora, split);
    return {needs_x ? grad_x : Tensor(),
            Tensor(),  // weight: frozen
            Tensor(),  // bias: frozen
            ctx->saved_data["needs_a"].toBool() ? grad_a : Tensor(),
            ctx->saved_data["needs_b"].toBool() ? grad_b : Tensor(),
            Tensor(),  // scaling
            needs_x_lora ? grad_x_lora : Tensor()};
  }
};

std::tuple<Tensor, Tensor> lora_linear_autograd(const Tensor& x, const Tensor& weight,
                                                const std::optional<Tensor>& bias,
                                                const Tensor& lora_a, const Tensor& lora_b,
                                                double scaling,
                                                const std::optional<Tensor>& x_lora) {
  auto out = LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scaling, x_lora);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, Autograd, m) { m.impl("lora_linear", &lora_linear_autograd); }

}  // namespace eefast
