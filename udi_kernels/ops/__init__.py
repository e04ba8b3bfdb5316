"""Public ops: argument checks, backend choice and torch.library registration (fake impls, autograd)."""
