// The NT-Xent op library `common._C`: the Python module init and the op schemas.
//
// Layout follows pytorch/extension-cpp: this file defines the ops (TORCH_LIBRARY(ssl_ops), the
// schemas in nt_xent.h's define_ops, listed in csrc/README.md), cpu/nt_xent_cpu.cpp holds their
// CPU kernels (TORCH_LIBRARY_IMPL(ssl_ops, CPU)), cuda/nt_xent_cuda.cu the CUDA kernels
// (TORCH_LIBRARY_IMPL(ssl_ops, CUDA), only in CUDA builds), and the Python side
// (common/nt_xent_op.py) adds the fake (meta) kernels and autograd. Every op, set_splits
// included, is defined in every build; which kernels a build has is the dispatcher's to say
// (common.nt_xent_op.available).
#include <Python.h>

#include <torch/library.h>

#include "nt_xent.h"

extern "C" {
// `import common._C` loads this library, whose static initialisers register the ops with the
// dispatcher. The module itself is empty (the ops are reached as torch.ops.ssl_ops.*).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ssl_ops, m) {
  ssl_ops::define_ops(m);
}
