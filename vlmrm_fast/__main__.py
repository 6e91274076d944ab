"""``python -m vlmrm_fast``: the same as the ``vlmrm-fast`` command."""
import sys

from vlmrm_fast.cli import main

sys.exit(main())
