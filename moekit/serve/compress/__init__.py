"""Compressing a trained MoE: distillation into a dense student, merging and pruning experts,
weight-only quantization (``moekit compress``). Each is a function on modules; the CLI writes
the result as a run or export directory every reader takes."""
