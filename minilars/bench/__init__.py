"""Benchmarks behind `minilars bench` (minilars/commands/bench.py): each module has
add_arguments(parser) and run(args), and prints its figures as a table."""
