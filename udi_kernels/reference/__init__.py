"""Eager PyTorch implementations: the semantics every kernel is tested against."""
