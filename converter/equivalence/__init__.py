"""Equivalence: synthesised or real inputs, onnxruntime sessions, the float64 reference, comparison."""
