"""Shared by the tests and the benchmarks: float64 references of the ops and the UDI head, input builders, and the
pytest fixture that poisons uninitialised memory. Import the modules (udi_kernels.testing.references, .inputs,
.poison, .losses for the losses); nothing here is used by the ops themselves."""
