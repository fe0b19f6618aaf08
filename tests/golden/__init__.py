"""Golden bits: recorded hashes of outputs (record.py writes bits.json; tests/test_golden.py checks it)."""
