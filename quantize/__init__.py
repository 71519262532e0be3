"""Quantization stage (AIMET post-training quantization)."""
