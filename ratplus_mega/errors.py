"""The project's error type: a problem the user can fix (a bad input, a run that cannot go on), reported by the
``ratplus`` command as one line, ``ratplus <command>: error: <message>``, with exit status 2.

Raise it with a message that names the file, key or step involved and says what to do; ``ratplus --debug``
(or ``RATPLUS_DEBUG=1``) prints the traceback as well. It is a ``ValueError``, the library's long-standing
type for bad input, so callers that catch that keep working. This module imports nothing, so any part of the
package (and the data-preparation jobs) may use it.
"""

from __future__ import annotations

__all__ = ["RatplusError"]


class RatplusError(ValueError):
    """A user-facing failure with a one-line message (no traceback unless debugging)."""
