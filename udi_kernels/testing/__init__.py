"""Shared test and benchmark helpers: float64 eager references and random input builders (udi_kernels.testing.losses
for the losses)."""
