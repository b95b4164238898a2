"""Microbenchmark suites and the ``pykernels-bench`` CLI (``bench.cli:main``).

Every figure is stated against the memory bandwidth measured in the same run
(``roofline.probe_memory_bandwidth``) and against baselines timed in the same run.
"""
