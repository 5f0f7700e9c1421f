"""``python -m dbmtl_jax.experiments`` is the ``dbmtl-jax`` command."""

import sys

from dbmtl_jax.experiments.cli import main

sys.exit(main())
