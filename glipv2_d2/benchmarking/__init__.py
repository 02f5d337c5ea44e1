"""Pieces of tools/benchmark.py that time GLIPv2 against peer detectors and profile its ops."""
