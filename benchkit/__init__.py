"""The benchmark toolkit: what bench.py, the scripts in scripts/ and the tests share to drive servers from outside.

- `client.py`: the benchmark client's protocols, one timed request, and a run of C clients (bench.py's engine);
- `prompts.py`: prompts of an exact token length; `stats.py`: a run's figures; `report.py`: tables and plots;
- `load.py`: the one load loop, client threads that keep requests in flight;
- `fault_load.py`: a bounded load whose every outcome is recorded, for checks that kill or reload servers;
- `servers.py`: server processes: a free port, start, wait until ready, stop (also on SIGTERM);
- `models.py`: random-weight models shaped like real ones, for machines without network.

The server never imports it (tests/test_layout.py checks that); it imports the server's package only for the
embedded model's folder and name.
"""
