"""Deployment profiling: ONNX export, ONNX Runtime latency, FLOPs, Pareto plot."""
