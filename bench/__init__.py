"""Benchmark suite of mlbfgs_fused: the instrument behind every performance claim.

Entry points: ``python -m bench.run`` (everything; ``make bench``),
``python -m bench.train`` (training runs), ``pytest bench/ --benchmark-only``
(kernel microbenchmarks), ``python -m bench.report DIR`` (plots and RESULTS.md
from the JSON files of a results folder). Results land in
``bench/results/<machine>/``.
"""
