"""`python -m unialignment_jax` is the `unialignment` command."""

import sys

from unialignment_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
