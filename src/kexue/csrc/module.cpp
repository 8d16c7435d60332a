// The Python bindings of kexue's native kernels (kexue.native).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("probit_cross_entropy", &probit_cross_entropy,
             "The probit head's per-row loss and gradient (kexue.distributions)");
  module.def("zlpr", &zlpr, "The dense ZLPR loss and its gradient per row (kexue.losses)");
}
