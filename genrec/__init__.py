"""genrec: generative recommendation (HSTU) from raw interaction logs to a served model."""

__version__ = "0.1.0"
