"""Evaluation: measuring a model."""
