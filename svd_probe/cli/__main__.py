"""`python -m svd_probe.cli`."""

from svd_probe.cli import main

main()
