"""The pipeline benchmark, by role; run it as `python -m benchmarks.pipeline_bench`.

- `config`: options, the worker configurations, the targets;
- `run`: services, one pass of a configuration (namespace, database, workers, client
  subprocess), the passes in ABBA order, the claim-latency hook, `main`;
- `client`: the client subprocess (`--client PLAN`) that submits and times the rounds;
- `inprocess`: per-dispatch counts per phase, the pyinstrument profile, 1 vs 2 processes;
- `analysis`: medians, ratios, targets (the report's summary);
- `report`: `pipeline.json`, `pipeline.md`, `pipeline.png`.
"""
