// The one place the eefast op schemas are defined. Kernels register per dispatch key in their
// own files (lora_linear_cpu.cpp, lora_linear_cuda.cpp, ...) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

// Importing eefast._C runs the static registrations below; the module itself is empty. Only
// the limited C API is used, so the build is one abi3 .so for every CPython >= 3.10.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(eefast, m) {
  // y = x W^T + b + scaling * (x_lora A^T) B^T, with x_lora = dropout(x) or x itself (None).
  // Returns (y, xa) where xa = x_lora A^T is the r-wide intermediate the backward needs.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, Tensor? x_lora=None) -> (Tensor, Tensor)");
  // Gradients of lora_linear. W and b are frozen, so they get none. With split_grad_x the
  // low-rank input gradient comes back separately (as grad_x_lora, for a dropout in front of
  // it); otherwise it is folded into grad_x. Outputs that are not needed are empty [0] tensors.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor x_lora, Tensor xa, float scaling, bool needs_grad_x, bool split_grad_x) "
      "-> (Tensor grad_x, Tensor grad_x_lora, Tensor grad_a, Tensor grad_b)");
  // Softmax statistics of (hidden W^T + b) / temperature per row, without [N, vocab] logits:
  // logsumexp, max prob, argmax, entropy and top-1 minus top-2 prob (fp32; argmax int64).
  // Forward only: it makes decode-time exit decisions.
  m.def(
      "exit_stats(Tensor hidden, Tensor weight, Tensor? bias=None, float temperature=1.0) "
      "-> (Tensor lse, Tensor max_prob, Tensor argmax, Tensor entropy, Tensor margin)");
}
