// Makes `import oar_kernels._C` load this library, whose static initialisers register the
// CPU kernels with the dispatcher. No Python bindings: every op is reached via torch.ops.oar.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
