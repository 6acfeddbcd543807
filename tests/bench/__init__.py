"""Benchmarks of the real stack (``make bench``), against a bare-aiohttp floor and the
design's ceiling (aiohttp + one grpc.aio call to a service that does nothing), and when
asked (``BENCH_INPROCESS=1``) the same work without the gRPC hop (``inprocess.py``).

Not a test suite: pytest does not collect it (no ``test_`` files). Run it with
``make bench`` or ``.venv/bin/python -m tests.bench --help``; docs/benchmarks.md explains
the cases, the floor, the targets and the latest figures.
"""
