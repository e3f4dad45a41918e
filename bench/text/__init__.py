"""The text family of the benchmark: MiniLM-L6 exported to ONNX, text data shipped inside PyPI packages."""
