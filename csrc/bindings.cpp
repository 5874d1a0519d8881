// Registers the memtrace operators with the PyTorch dispatcher. Importing memtrace._C (an empty
// Python module) loads this library, after which Python calls torch.ops.memtrace.<op> on tensors of
// either device and the dispatcher picks the CPU or the CUDA kernel.
#include <Python.h>
#include <torch/library.h>

#include "routing_trie.h"

extern "C" {
// A real (empty) module so that `import memtrace._C` works and runs the static registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "memtrace C++/CUDA operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(memtrace, m) {
  // Merge a batch of routing paths into a trie held as level-ordered arrays (see routing_trie.h).
  // Returns new arrays (parent, expert, count, reward_sum, first_seen, last_seen, level_sizes);
  // level_sizes comes back as an int64 tensor on the CPU, whatever the device of the trie.
  m.def(
      "routing_update(Tensor parent, Tensor expert, Tensor count, Tensor reward_sum, Tensor first_seen, "
      "Tensor last_seen, int[] level_sizes, Tensor paths, Tensor rewards, int step, int max_depth, "
      "int num_experts, bool suffix) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memtrace, CPU, m) { m.impl("routing_update", &memtrace::routing_update_cpu); }

#ifdef MEMTRACE_WITH_CUDA
TORCH_LIBRARY_IMPL(memtrace, CUDA, m) { m.impl("routing_update", &memtrace::routing_update_cuda); }
#endif
