"""ratplus-mega: a pretraining stack for RAT+ language models."""

__version__ = "0.1.0"
