"""`python -m vlmr1_jax.cli`: the `vlmr1` command."""

import sys

from vlmr1_jax.cli import main

sys.exit(main())
