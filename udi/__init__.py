"""UDI pre-training on udi_kernels: data, model, loop, evaluation."""
