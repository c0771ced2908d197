"""Measurement: memory, timing and reporting helpers."""
