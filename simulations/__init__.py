"""Command line, experiment configs, benchmarks and reports."""
