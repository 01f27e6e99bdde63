"""`python -m bench.chaos`: faults against a real cluster, and a checker of what clients saw.

A real 3-server ZooKeeper ensemble, coordinators and agents run as processes, each in a
network namespace of its own (``net``, ``fleet``); shards hold a few MB each; client
threads put, delete and read through the client library and record every operation
(``workload``); a seeded nemesis inflicts overlapping faults, each undone by itself
(``nemesis``); when they stop, the run waits for the cluster to converge, verifies the
replicas, reads every key, and checks the history (``checker``). ``run`` ties it
together; docs/reliability.md has the fault matrix and the figures.
"""
