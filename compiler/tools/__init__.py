"""Tools that drive the compiler: benchmarks, accuracy, Pareto fronts, ONNX Runtime baselines,
ONNX conformance.  They sit above the driver; nothing below imports them."""
