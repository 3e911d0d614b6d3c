"""``python -m experiments.bench``: the benchmark CLI of experiments/bench/cli.py."""
from experiments.bench.cli import main

if __name__ == "__main__":
    main()
