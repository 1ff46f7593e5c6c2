from .op import block_attention, sparse_attention

__all__ = ["block_attention", "sparse_attention"]
