"""``python -m recipes NAME [NAME...]``: apply recipe files with ``dvc exp run``."""

import sys

from pipeline.errors import run_entry_point
from recipes.apply import main

sys.exit(run_entry_point(main))
