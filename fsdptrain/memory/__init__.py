"""Memory observability: per-rank statistics from CUDA's allocator or, on CPU, the process."""
