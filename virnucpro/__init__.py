"""virnucpro: the VirNucPro viral-read classifier with persistent model daemons."""

__version__ = "0.1.0"
