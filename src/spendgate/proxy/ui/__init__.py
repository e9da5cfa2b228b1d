"""The dashboard at ``/ui``: overview, budgets, approvals, decisions and keys, behind the admin token."""

from spendgate.proxy.ui.routes import add_routes

__all__ = ["add_routes"]
