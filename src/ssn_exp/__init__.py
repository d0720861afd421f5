"""ssn_exp: train, certify and compare l1-certified classifiers by smoothing.

Layers, from the inside out (inner ones never import outer ones):

1. library, plain torch + numpy, usable with any ``nn.Module``: :mod:`ssn_exp.noises` (``Uniform``, ``SSN``,
   ``DSSN`` noise), :mod:`ssn_exp.certify` (exact, randomized and box-constrained certificates, metrics),
   :mod:`ssn_exp.models` (networks, the authors' released checkpoints);
2. :mod:`ssn_exp.lightning`: training objective, data modules, certification as a callback, result files;
3. :mod:`ssn_exp.cli` and the Hydra configs in ``ssn_exp/conf``: the entry points (``python -m ssn_exp``,
   ``python -m ssn_exp.certify``, ``python -m ssn_exp.sweep``; the ``__main__`` modules only call them);
4. :mod:`ssn_exp.report`: tables and curves from the result files (``python -m ssn_exp.report``).

:mod:`ssn_exp.exceptions` holds the base class of the user-facing errors.
"""

__version__ = "0.1.0"
