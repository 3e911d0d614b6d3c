"""Benchmarks: commands that print figures and ratios (``python -m experiments.bench``).

``cli`` times WilKE's scan (fast against reference, exact against approximate), ROME, AlphaEdit and
the statistics pass on real or randomly initialised models of real shapes; ``agreement`` checks the
approximate scan against the exact one; ``models`` builds the benchmark's models.
"""
