"""Burrow's test harness, in the way ``kazoo.testing`` is kazoo's: real ZooKeeper, etcd, Consul,
moto (S3) and Prefect servers started as local processes (:mod:`burrow.testing.servers`).

The tests, the benchmarks and the demo use it. The product never imports it: nothing that
``burrow backup`` (or any other command) loads reaches this package, and
``tests/test_layering.py`` checks that.
"""
