"""Offline tuning tools: self-distillation data, exit-head training and calibration, prompt sets."""
