from .op import gated_scan, gated_scan_kv

__all__ = ["gated_scan", "gated_scan_kv"]
