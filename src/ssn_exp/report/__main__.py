"""``python -m ssn_exp.report PATH... [--out DIR] [--csv FILE] [--radii R ...] [--no-plots]``."""

from ssn_exp.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
