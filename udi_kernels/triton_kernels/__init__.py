"""Triton kernels. Import lazily: TRITON_INTERPRET must be set before these modules load."""
