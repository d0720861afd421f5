"""ssn_exp: train, certify and compare l1-certified classifiers by smoothing.

Layer 1 (plain torch + numpy, usable with any ``nn.Module``):

- :mod:`ssn_exp.smoothing` -- ``Uniform``, ``SSN``, ``DSSN`` noise;
- :mod:`ssn_exp.certify` -- exact and randomized certificates, certified accuracy, ACR, tables.
"""

__version__ = "0.1.0"
