"""Mixed-precision planning: per-layer sensitivity (perturbation or Hessian trace), measured
kernel latency per width, and the ILP that picks the bits within the budgets."""
