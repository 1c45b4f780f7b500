"""eefast microbenchmarks: `python -m benchmarks ops --help`."""
