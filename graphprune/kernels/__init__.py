"""Sparse-kernel inference modules and the measurements that decide when they pay off."""
