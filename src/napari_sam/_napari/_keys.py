"""Keyboard shortcuts and the negative-point click of an interactive session.

Keys are bound with ``overwrite=True`` on the viewer and on the session's
own layers (prompt points, prompt boxes, preview): a layer's bindings win
over the viewer's while it is selected, so binding them there too keeps
the keys working whichever of our layers is active. None of the keys is a
viewer key of napari (V is visibility); on our own layers they replace
napari's defaults we do not need there (T = path mode on a Shapes layer,
M = new label on a Labels layer).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from .layers import NEGATIVE

if TYPE_CHECKING:
    from .session import SamSession

#: Action -> key (napari key-binding strings).
KEYS: dict[str, str] = {
    "commit": "C",
    "clear": "Shift-C",
    "toggle_sign": "T",
    "next_mask": "M",
    "previous_mask": "Shift-M",
}

#: Holding this modifier while clicking adds a negative point.
NEGATIVE_MODIFIER = "Shift"


def _actions(session: SamSession) -> dict[str, object]:
    return {
        "commit": lambda _owner: session.commit_from_ui(),
        "clear": lambda _owner: session.clear_prompts(),
        "toggle_sign": lambda _owner: session.toggle_sign(),
        "next_mask": lambda _owner: session.cycle_mask(1),
        "previous_mask": lambda _owner: session.cycle_mask(-1),
    }


def bind_keys(session: SamSession, owner) -> None:
    """Bind :data:`KEYS` on ``owner`` (the viewer or one of the session's layers)."""
    for action, func in _actions(session).items():
        owner.bind_key(KEYS[action], func, overwrite=True)


def unbind_keys(owner) -> None:
    """Remove the bindings of :func:`bind_keys` from ``owner``."""
    for key in KEYS.values():
        with contextlib.suppress(KeyError, ValueError):
            owner.bind_key(key, None)


def negative_click(session: SamSession):
    """A Points mouse-drag callback: a click with :data:`NEGATIVE_MODIFIER` or the
    right button adds a negative point, any other click uses ``session.next_sign``.

    napari adds the point on release; this runs on press and sets the
    layer's ``feature_defaults`` that the new point takes.
    """

    def callback(layer, event):
        if layer.mode != "add":
            return
        negative = NEGATIVE_MODIFIER in event.modifiers or getattr(event, "button", 1) == 2
        layer.feature_defaults["sign"] = NEGATIVE if negative else session.next_sign

    return callback
