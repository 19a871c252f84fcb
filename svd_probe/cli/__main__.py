"""`python -m svd_probe.cli`."""

from svd_probe.cli import main

# Guarded: the band solver's spawned worker processes import the main module (as __mp_main__).
if __name__ == "__main__":
    main()
