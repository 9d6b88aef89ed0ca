"""Experiments, reports and the demo."""
