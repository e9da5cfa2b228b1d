"""The ``spendgate`` command line."""
