"""Benchmarks: training step speed (step), against transformers (vs_peer), checkpoints, the data path, the GPU
check; their markdown tables (tables)."""
