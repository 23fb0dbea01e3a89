"""`python -m macnat.manager HANDOVER`: what `macnat attach` execs into (see macnat.manager)."""

import json
import sys

from macnat.errors import MacnatError
from macnat.manager import main

try:
    sys.exit(main(json.loads(sys.argv[1])))
except MacnatError as exc:
    print(f"macnat: error: {exc}", file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", 1))
