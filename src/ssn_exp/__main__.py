"""``python -m ssn_exp [overrides]``: train + certify (see ``python -m ssn_exp --help``)."""

from ssn_exp.cli.train import main

if __name__ == "__main__":
    main()
