from .op import sparse_attention

__all__ = ["sparse_attention"]
