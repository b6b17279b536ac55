"""Throughput and scaling benchmarks (``benchmarks/throughput.py``, ``benchmarks/scaling.py``)."""
