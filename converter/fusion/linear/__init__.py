"""Linear ops (Gemm, MatMul, Einsum) and the affine steps around them: recognised by tables,
composed in float64 (algebra), merged as chains, branch sums and folds across views."""
