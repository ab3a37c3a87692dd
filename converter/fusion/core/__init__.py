"""The core of fusion, shared by every part: one Context per run, the one constant resolver, the one
Declined, the merge protocol, graph reading, order, shapes, steps, dtypes, writing, invariants."""
