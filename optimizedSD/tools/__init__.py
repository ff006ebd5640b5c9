"""Tools for the project rather than for users' images: benchmarks against peers, the CPU op profile, the demo model's
synthetic data and its training script.

May import every layer but the entry scripts.
"""
