"""Development and proof tooling, not the domain: the dev stack (`python -m mailbox up`), the
demo, the embedded Redis, and the workload audit that the fault, load and soak runs end with.

Only this package and the CLI may import `tasks` (the Celery glue): the domain never does.
"""
