// The one place the eefast op schemas are defined. Kernels register per dispatch key in their
// own folders (csrc/<op>/cpu.cpp, cuda.cpp, autograd.cpp) with TORCH_LIBRARY_IMPL.
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
  // out = residual + scale * (act(x D^T + bd) U^T + bu), with residual = x when None (a series
  // adapter; a parallel one passes the sublayer's output). scale is a one-element float32
  // tensor, so it can be learned. Returns (out, z) where z = x D^T + bd, the float32
  // bottleneck pre-activation the backward needs. activation: identity, relu, gelu,
  // gelu_tanh, silu or tanh.
  m.def(
      "bottleneck_adapter(Tensor x, Tensor? residual, Tensor down_weight, Tensor? down_bias, "
      "Tensor up_weight, Tensor? up_bias, Tensor scale, str activation) -> (Tensor, Tensor)");
  // Gradients of bottleneck_adapter; that of the residual is grad_out itself. residual_is_x adds
  // grad_out to grad_x. grad_x and grad_scale are empty [0] tensors when not needed.
  m.def(
      "bottleneck_adapter_backward(Tensor grad_out, Tensor x, Tensor down_weight, "
      "Tensor up_weight, Tensor? up_bias, Tensor z, Tensor scale, str activation, "
      "bool residual_is_x, bool needs_grad_x, bool needs_grad_scale) -> (Tensor grad_x, "
      "Tensor grad_down_weight, Tensor grad_down_bias, Tensor grad_up_weight, "
      "Tensor grad_up_bias, Tensor grad_scale)");
  // y = x W^T + b, for decode: few rows (a decode batch or a speculative verify step) read W
  // once on CPU (up to 8), and each output's sum does not depend on the number of rows.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // decode_linear with a weight-only int8 weight: y = x (scales[:, None] * qweight)^T + b,
  // qweight int8 [out, in], scales float32 [out]. Differentiable in x (the weight is frozen).
  m.def("decode_linear_q8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor");
  // decode_linear with W as GGUF blocks (Q4_0, Q4_1 or Q8_0), qweight uint8 [out, in / 32,
  // block bytes] packed by pack_gguf. Few rows quantise x per group of 32 and use integer dot
  // products, as llama.cpp does; more rows dequantise W. Differentiable in x and bias.
  m.def("decode_linear_gguf(Tensor x, Tensor qweight, Tensor? bias=None) -> Tensor");
  // A GGUF tensor's rows of blocks (uint8 [out, in / 32, block bytes]) regrouped for the
  // kernels: the same bytes in tiles of 8 rows (csrc/cpu/gguf_blocks.h).
  m.def("pack_gguf(Tensor rows) -> Tensor");
  // The float32 [out, in] weight that packed GGUF blocks define, exactly.
  m.def("dequantize_gguf(Tensor qweight) -> Tensor");
  // One llama-family decoder block (RMSNorm, rotary, grouped-query attention over a KV cache,
  // SiLU-gated MLP) on h [batch, q, d] for a decode or verify step: writes the q new keys and
  // values to cache slots [cache_len, cache_len + q) and returns the block's output. allowed
  // [batch, q, cache_len + q] says which keys each query sees. weights/biases: q, k, v, o,
  // gate, up, down; with `scales` (one float32 [out] per linear) the weights are int8, as in
  // decode_linear_q8; uint8 weights are GGUF blocks, as in decode_linear_gguf. Inference only
  // (it mutates the caches).
  m.def(
      "decode_block(Tensor h, Tensor cos, Tensor sin, Tensor allowed, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int cache_len, Tensor norm1, Tensor norm2, Tensor[] weights, "
      "Tensor?[] biases, float eps, float scaling, Tensor[] scales) -> Tensor");
  // Softmax statistics of (hidden W^T + b) / temperature per row, without [N, vocab] logits:
  // logsumexp, max prob, argmax, entropy and top-1 minus top-2 prob (fp32; argmax int64).
  // Forward only: it makes decode-time exit decisions.
  m.def(
      "exit_stats(Tensor hidden, Tensor weight, Tensor? bias=None, float temperature=1.0) "
      "-> (Tensor lse, Tensor max_prob, Tensor argmax, Tensor entropy, Tensor margin)");
  // Fused LM head + cross-entropy of one exit: loss of (hidden W^T + b) against targets, plus
  // z_loss * lse^2 and kd_weight * KL(teacher || student) when a teacher head is given, with
  // torch's label smoothing and class weights and Gemma-2's logit softcap (0: none), never
  // holding [tokens, vocab]; lse is each row's logsumexp (of the capped logits). reduction: 0 none, 1 mean over non-ignored rows, 2 sum. For mean
  // and sum it also returns the gradients of the loss (hidden; weight and bias when
  // weight_grad); for none those are empty and linear_cross_entropy_backward computes them.
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "Tensor? teacher_hidden, Tensor? teacher_weight, int ignore_index, int reduction, "
      "float z_loss, float kd_weight, float label_smoothing, float softcap, "
      "Tensor? class_weight, bool weight_grad) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, Tensor lse)");
  // Several exits sharing one LM head (mean or sum): total = sum_e exit_weights[e] * loss_e, the
  // per-exit losses, and the gradients of total, the weight's accumulated in one buffer.
  m.def(
      "linear_cross_entropy_multi(Tensor[] hiddens, Tensor weight, Tensor targets, Tensor? bias, "
      "float[] exit_weights, Tensor? teacher_hidden, Tensor? teacher_weight, int ignore_index, "
      "int reduction, float z_loss, float kd_weight, float label_smoothing, float softcap, "
      "Tensor? class_weight, bool weight_grad) "
      "-> (Tensor total, Tensor losses, Tensor[] grad_hiddens, Tensor grad_weight, "
      "Tensor grad_bias)");
  // Gradients of sum_i grad_rows[i] * loss_i (reduction none), recomputing the logits by chunk.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_rows, Tensor hidden, Tensor weight, "
      "Tensor targets, Tensor? bias, Tensor? teacher_hidden, Tensor? teacher_weight, "
      "int ignore_index, float z_loss, float kd_weight, float label_smoothing, float softcap, "
      "Tensor? class_weight, bool weight_grad) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}
