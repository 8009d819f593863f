"""PathGuard's HTTP service (FastAPI), installed as ``pathguard.service``:
``app.create_app`` builds the app from its parts (state, dependencies,
errors, body, responses, routes), ``server.serve`` runs it with uvicorn
(`pathguard serve` is pathguard/jobs/serve.py).  The service calls into
``pathguard.detector``; ``pathguard.detector`` never imports it.
See service/README.md and docs/contracts.md (HTTP contract)."""
