"""AAMI beat classes and the map from MIT-BIH beat symbols to them.

The map follows ANSI/AAMI EC57: N (normal and bundle branch block beats), S (supraventricular
ectopic), V (ventricular ectopic), F (fusion of ventricular and normal), Q (paced, fusion of
paced and normal, unclassifiable). Symbols not in the table (rhythm changes ``+``, signal
quality ``~``, comments ``"`` and other non-beat annotations) are not beats.
"""

from __future__ import annotations

AAMI_CLASSES: tuple[str, ...] = ("N", "S", "V", "F", "Q")

BEAT_SYMBOL_TO_AAMI: dict[str, str] = {
    "N": "N",  # normal
    "L": "N",  # left bundle branch block
    "R": "N",  # right bundle branch block
    "e": "N",  # atrial escape
    "j": "N",  # nodal (junctional) escape
    "A": "S",  # atrial premature
    "a": "S",  # aberrated atrial premature
    "J": "S",  # nodal (junctional) premature
    "S": "S",  # supraventricular premature or ectopic
    "V": "V",  # premature ventricular contraction
    "E": "V",  # ventricular escape
    "F": "F",  # fusion of ventricular and normal
    "/": "Q",  # paced
    "f": "Q",  # fusion of paced and normal
    "Q": "Q",  # unclassifiable
    # Beat labels that MIT-BIH does not use, mapped like their closest MIT-BIH labels.
    "B": "N",  # bundle branch block, side unspecified
    "n": "N",  # supraventricular escape, an escape beat like e and j
    "r": "V",  # R-on-T premature ventricular contraction
    "?": "Q",  # beat not classified during learning
}

# Annotation symbols that mark no beat. Symbols outside both tables are reported by ingest.
NON_BEAT_SYMBOLS: frozenset[str] = frozenset("+~\"|!x[]()pt^u`'s=@*DTU")


def class_index(name: str) -> int:
    """Return the position of an AAMI class name in ``AAMI_CLASSES``.

    Raises:
        ValueError: If ``name`` is not one of N, S, V, F, Q.
    """
    try:
        return AAMI_CLASSES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown beat class {name!r}; expected one of {', '.join(AAMI_CLASSES)}"
        ) from None
