// The Python module shell of udi_kernels._C. Importing it loads this library, whose
// static initialisers register every op schema and kernel with the dispatcher.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
