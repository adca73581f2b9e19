"""FPET: faster parameter-efficient tuning of Vision Transformers with learned token merging."""

__version__ = "0.1.0"
