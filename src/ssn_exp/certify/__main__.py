"""``python -m ssn_exp.certify ckpt=PATH [overrides]``: certify a saved checkpoint (see ``--help``)."""

from ssn_exp.cli.certify import main

if __name__ == "__main__":
    main()
