"""Config-driven experiments: train networks that differ only in their activation and measure
how the curvature of their loss surface differs, along training. See ``python -m experiments``."""
