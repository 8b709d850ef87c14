"""
Side-by-side benchmarks of the twistnet services against their peers (issue 6).

Run ``uv run --group bench python -m benchmarks all``; see ``benchmarks/README.md``.
"""
