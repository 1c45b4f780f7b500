// The element types the CUDA kernels take, as plain C++ (no torch headers): the glue in
// csrc/<op>/cuda.cpp maps torch's dtype to it.
#pragma once

namespace eefast::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

}  // namespace eefast::cuda
