"""The PathGuard detector library (installed as ``pathguard.detector``):
data -> model -> paths -> profile -> scores -> bundle.  It imports nothing
else of pathguard: the service, the attacks and the commands build on it
(docs/architecture.md)."""
