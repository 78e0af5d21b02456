"""How a learned result compares with its baseline: a stated tie rule, the same for every summary."""

from __future__ import annotations

TIE_MARGIN = 0.02
TIE_RULE = (
    f"losses within {TIE_MARGIN:.0%} (relative) of the baseline's are a tie: evaluations over "
    "a few initializations or one validation split are noisier than that"
)


def versus(loss: float, reference: float, margin: float = TIE_MARGIN) -> str:
    """``"better"``, ``"tie"`` or ``"worse"``: ``loss`` against ``reference`` with a relative
    margin (a difference below ``margin * reference`` is a tie).

    Example:
        >>> versus(0.1587, 0.1605), versus(0.150, 0.1605), versus(0.17, 0.1605)
        ('tie', 'better', 'worse')
    """
    if abs(loss - reference) <= margin * abs(reference):
        return "tie"
    return "better" if loss < reference else "worse"
