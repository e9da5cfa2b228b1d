"""The in-process door: guard the official clients, budgets and tags carried by contextvars.

The public names are re-exported from :mod:`spendgate`.
"""
