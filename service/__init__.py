"""PathGuard's HTTP service (FastAPI): ``create_app`` builds the app,
``serve`` runs it with uvicorn, ``cli`` gives `pathguard serve` its options.
The service calls into ``detector``; ``detector`` never imports it.
See service/README.md for the HTTP contract."""
