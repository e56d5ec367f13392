"""Second runtime for batch scoring: ONNX Runtime (fp32, int8) next to the SavedModel, and the
gate that keeps an optimised variant only when it is faster and scores like the baseline."""
