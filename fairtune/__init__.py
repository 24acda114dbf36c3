"""fairtune: hyperparameter search for fair feature distillation (MFD, CVPR 2021) and its baselines."""

__version__ = "0.1.0"
