"""python -m ssn_exp [overrides]: train + certify (see --help)."""

from ssn_exp.cli import train_main

if __name__ == "__main__":
    train_main()
