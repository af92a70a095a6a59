"""Speed benchmarks for kdbench: python -m benchmarks --help."""
