"""Automatic feature labels: what a feature fires on, and what it makes the model say next.

A label reads `' def' ' class' → ' __init__'`: the feature's most frequent activating tokens
(among its top contexts), then the tokens its decoder direction promotes most. Tokens are shown
as Python reprs so leading spaces and newlines stay visible. It is a first guess that a
researcher replaces with `FeatureDictionary.set_label`; automatic relabelling never touches a
label a user wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

DEAD_LABEL = "dead"
ARROW = " → "
ELLIPSIS = "…"


def show_token(token: str) -> str:
    """A token as a short quoted string with its whitespace visible (`' def'`, `'\\n'`)."""
    return repr(token)


def _join(tokens: Sequence[str], budget: int) -> str:
    """As many shown tokens as fit in `budget` characters (at least the first, cut if it must be)."""
    shown: list[str] = []
    for token in tokens:
        candidate = " ".join([*shown, show_token(token)])
        if len(candidate) > budget:
            break
        shown.append(show_token(token))
    if not shown and tokens:
        return show_token(tokens[0])[: max(budget - 1, 1)] + ELLIPSIS
    return " ".join(shown)


def auto_label(top_tokens: Sequence[str], logit_positive: Sequence[str] = (), *, dead: bool = False,
               max_tokens: int = 3, max_promoted: int = 2, max_chars: int = 60) -> str:
    """A one-line label of at most `max_chars` characters (`dead` for a feature that never fired).

    `top_tokens`: activating tokens, most frequent first; `logit_positive`: promoted tokens,
    strongest first. The activating side gets the room it needs first (it says most about the
    feature), the promoted side what is left.
    """
    if dead:
        return DEAD_LABEL
    firing = [t for t in top_tokens if t][:max_tokens]
    promoted = [t for t in logit_positive if t][:max_promoted]
    if not firing and not promoted:
        return "?"
    if not promoted:
        return _join(firing, max_chars)
    if not firing:
        return ARROW.strip() + " " + _join(promoted, max_chars - 2)
    left = _join(firing, max_chars - len(ARROW) - 8)
    right = _join(promoted, max_chars - len(left) - len(ARROW))
    return f"{left}{ARROW}{right}"
