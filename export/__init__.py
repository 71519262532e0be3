"""Export stage: a registered torch model -> a simplified, verified Track 3 ONNX."""
