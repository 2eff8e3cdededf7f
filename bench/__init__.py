"""Benchmarks (not tests): ``python -m bench.run`` from the repository root; see docs/benchmarks.md.

The scripts are modules of this package and import each other as ``bench.<module>``; the
daemon runs through the integration tests' helper, ``tests.daemon_helpers``.
"""
