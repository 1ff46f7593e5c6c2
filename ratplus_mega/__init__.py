"""ratplus-mega: a pretraining stack for RAT+ language models."""

from .quiet import silence_known_import_messages

__version__ = "0.1.0"

silence_known_import_messages()
