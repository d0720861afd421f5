"""``python -m ssn_exp.sweep NAME [overrides]``: a named sweep and its report (see :mod:`ssn_exp.cli.sweep`)."""

from ssn_exp.cli.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
