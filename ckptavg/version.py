"""The version of ckptavg, in a module of its own so that the library can name it without importing the package."""

__version__ = "0.1.0"
