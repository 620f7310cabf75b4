"""saeworks: sparse autoencoders for Hugging Face language models, from raw text to a feature dictionary."""

from saeworks.sae.version import package_version

__version__ = package_version()
