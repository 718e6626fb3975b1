"""Tiny random-weight models, test engines and fixtures for every distribution's tests and the benchmark. Never imported by the core."""
