"""Tables and a figure from a sweep.  python report.py <pipeline run or multirun folder> [--harm-metric ...]"""

from sdd.cli import user_errors
from sdd.report import main

if __name__ == "__main__":
    raise SystemExit(user_errors(main)())
