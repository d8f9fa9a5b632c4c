"""Tier classifier: predicts whether a prompt needs the strong model tier.

Router-facing API lives in :mod:`classifier.model` (``load_scorer``, ``resolve_artifact``);
training, calibration, evaluation and artifact tooling are reached through
``python -m kvroute.classifier.cli``.  Importing the package does not import torch.
"""
