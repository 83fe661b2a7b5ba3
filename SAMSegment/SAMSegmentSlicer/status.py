"""How the module panel and the SAM effect show a status line (one look for both)."""

from __future__ import annotations

from typing import Any

ERROR_STYLE = "color: #c0392b"


def show_status(label: Any, text: str, error: bool = False) -> None:
    """Put ``text`` in the Qt label ``label``, in red when it reports an ``error``."""
    label.setText(text)
    label.setStyleSheet(ERROR_STYLE if error else "")
