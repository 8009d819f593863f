"""The jobs behind the `pathguard` command: train, measure, fit, attack,
evaluate, adaptive, explain, serve.  Each job module has a ``Config``
dataclass (its options and their defaults, the only place they are
written), and a ``run(cfg)`` that does the work; ``pathguard.cli`` turns
every ``Config`` into command-line options the same way."""
