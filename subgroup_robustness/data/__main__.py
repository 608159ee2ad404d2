"""``python -m subgroup_robustness.data``: the describe command (see describe.py)."""

import sys

from subgroup_robustness.data.describe import main

if __name__ == "__main__":
    sys.exit(main())
