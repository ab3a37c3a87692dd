"""Fusion in three parts: core (constants, context, declined, the merge protocol), linear, conv;
the engine runs their finders to a fixpoint, and the pass wraps it for onnx-ir."""
