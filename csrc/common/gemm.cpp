#include "common/gemm.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>

namespace eefast {
namespace {

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta result + alpha mat1
// mat2. Not in torch's public headers, so it is looked up by its mangled name at run time: a
// torch without it (or with another signature) gives no symbol, and ATen's GEMM runs instead.
using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float,
                              float);
constexpr const char* kMkldnnMatmul = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

MkldnnMatmul find_mkldnn_matmul() {
  if (std::getenv("EEFAST_DISABLE_ONEDNN") != nullptr) return nullptr;
  void* sym = dlsym(RTLD_DEFAULT, kMkldnnMatmul);
  if (sym == nullptr) {
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
      sym = dlsym(lib, kMkldnnMatmul);
      dlclose(lib);
    }
  }
  return reinterpret_cast<MkldnnMatmul>(sym);
}

// Found on first use, and cleared the first time oneDNN throws: torch 2.13's mkldnn_matmul checks
// for bf16 hardware (AVX-512 BW/VL/DQ or AVX-NE-CONVERT) even for float32, so it throws on
// AVX2-only CPUs. Any refusal leaves ATen's GEMM for the rest of the process.
std::atomic<MkldnnMatmul>& mkldnn_matmul() {
  static std::atomic<MkldnnMatmul> fn{find_mkldnn_matmul()};
  return fn;
}

// fn(a, b, out, beta, 1); false (and oneDNN off from now on) where it threw. Its checks come
// before any work, so out is untouched then.
bool try_mkldnn(MkldnnMatmul fn, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                float beta) {
  try {
    fn(a, b, out, beta, 1.f);
    return true;
  } catch (const c10::Error&) {
    mkldnn_matmul().store(nullptr);
    return false;
  }
}

}  // namespace

void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "gemm: cannot multiply ", a.sizes(), " by ", b.sizes(), " into ", out.sizes());
  const auto f32 = at::kFloat;
  if (MkldnnMatmul fn = mkldnn_matmul().load(); fn != nullptr && a.is_cpu() &&
      a.scalar_type() == f32 && b.scalar_type() == f32 && out.scalar_type() == f32 &&
      out.is_contiguous() && a.numel() > 0 && b.numel() > 0 &&
      try_mkldnn(fn, a, b, out, accumulate ? 1.f : 0.f)) {
    return;
  }
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void gemm_plus(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  if (c.defined()) out.copy_(c.expand_as(out));
  gemm(a, b, out, /*accumulate=*/c.defined());
}

}  // namespace eefast
