"""The one base class of every error a user can cause and fix (bad config, missing file, wrong hook).

Each stage raises a subclass with a one-line message that says what was wrong and how to fix it;
the CLI prints that line and exits with status 2 for any `SaeworksError`, with no list to keep.
Errors that are not the user's (bugs) stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations


class SaeworksError(Exception):
    """A failure the user can fix: the message names what was wrong and what to do."""
