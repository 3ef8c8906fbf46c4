"""Test-only infrastructure, shared by the tests and the benchmarks (not shipped with lazysd).

* :mod:`tests.support.checks`: bitwise comparisons.
* :mod:`tests.support.dist`: run a function on several real gloo ranks (``run_ranks``).
* :mod:`tests.support.hostile`: the hostile-checkpoint corpus builders.
* :mod:`tests.support.measure`: peak memory (``PeakRSS``), recorded reads, fresh processes.
* :mod:`tests.support.pagecache`: page-cache probes (``mincore``, eviction).
* :mod:`tests.support.servers`: real storage servers on 127.0.0.1 (moto S3, the GCS JSON API
  part gcsfs uses, HTTP with ranges, the Hub API part HfFileSystem uses) that count bytes per
  client and inject faults.

Benchmarks import these from a checkout: they put the repository root on ``sys.path`` first.
"""
