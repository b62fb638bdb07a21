"""The error the command line reports as one line and exit status 2: bad input or configuration.

Every component's user-fixable error derives from it, so `loracast` catches one type without importing
the heavy components that define the others.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what."""


class ConfigError(UserError, ValueError):
    """A server or client option that cannot work (a missing certificate, a key without a certificate)."""
