"""Naming rules shared by every entry point: class names and client-chosen identifiers.

Class names become folder names, metric keys and model outputs, so they are kept boring:
lowercase letters, digits and underscores, starting with a letter, at most 64 characters.
"""

from __future__ import annotations

import re

CLASS_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def class_name_problem(name: str) -> str | None:
    """Return why `name` is not a valid class name, or None when it is."""
    if not name:
        return "the class name is empty"
    if len(name) > 64:
        return f"the class name has {len(name)} characters; at most 64 are allowed"
    if not CLASS_NAME_RE.fullmatch(name):
        return (
            f"the class name {name!r} breaks the naming rule ^[a-z][a-z0-9_]{{0,63}}$ "
            "(lowercase letters, digits and underscores, starting with a letter)"
        )
    return None


def identifier_problem(kind: str, value: str) -> str | None:
    """Return why `value` is not a valid client identifier (camera id, request id, ...), or None."""
    if not value:
        return f"{kind} is missing"
    if len(value) > 128:
        return f"{kind} has {len(value)} characters; at most 128 are allowed"
    if not IDENTIFIER_RE.fullmatch(value):
        return f"{kind} {value[:64]!r} may only hold letters, digits and . _ : @ -"
    return None
