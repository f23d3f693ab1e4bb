"""The per-step accounting loop around a user's own code; lives in :mod:`carv.accounting.accountant`, re-exported
here for ``from carv.accountant import Accountant``."""

from carv.accounting.accountant import Accountant, AccountantStep

__all__ = ["Accountant", "AccountantStep"]
