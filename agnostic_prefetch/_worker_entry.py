"""Entry point of a worker process: ``python -m agnostic_prefetch._worker_entry``."""

from agnostic_prefetch._worker import main

main()
