"""Ground truth of the captioned-shapes dataset: vocabularies, ``ShapeSpec``, captions and the prompt parser.

A caption has one fixed grammar,

    "a <size> <color> <shape> in the <position> on a <background> background"

e.g. "a small red circle in the top left on a blue background", and ``parse_caption`` is its
strict inverse. Attribute names are chosen to be unambiguous at 32x32: saturated shape colours,
dark or light background tones, and a background never shares its name with the shape colour.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from difflab.errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 220, 25),
    "magenta": (220, 40, 220),
    "cyan": (30, 215, 225),
}

# Background tones: black/white/gray plus dark versions of three hues. "red"/"green"/"blue"
# backgrounds are never drawn under a shape of the same colour name.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (125, 125, 125),
    "red": (110, 20, 25),
    "green": (20, 95, 35),
    "blue": (25, 35, 120),
}

SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}
"""Nominal half-extent of a shape, as a fraction of the image side."""

POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
"""Nominal shape centre ``(x, y)`` as fractions of the image side, y pointing down."""

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position", "background")
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

TEMPLATE = "a {size} {color} {shape} in the {position} on a {background} background"


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one shapes image.

    The five named attributes are the ground truth a caption states; the jitter fields add
    variety without changing any attribute: ``dx, dy`` offset the centre (fractions of the
    image side, y down), ``scale`` multiplies the size, ``angle`` rotates the shape by that many
    degrees clockwise on screen.
    """

    shape: str
    color: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            value = getattr(self, attribute)
            valid = VOCABULARIES[attribute]
            if value not in valid:
                raise UserError(
                    f"unknown {attribute} {value!r}; valid {attribute}s: {', '.join(valid)}"
                )
        if self.background == self.color:
            raise UserError(
                f"a {self.color} shape on a {self.background} background would be invisible; "
                f"pick a background other than {self.background!r}"
            )

    def attributes(self) -> dict[str, str]:
        """The five named attributes as a dict (the caption's content)."""
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def without_jitter(self) -> ShapeSpec:
        """The same attributes at the nominal position, size and angle."""
        return dataclasses.replace(self, dx=0.0, dy=0.0, scale=1.0, angle=0.0)


def caption(spec: ShapeSpec) -> str:
    """The caption of a spec, e.g. "a small red circle in the top left on a blue background"."""
    return TEMPLATE.format(**spec.attributes())


def _template_regex() -> re.Pattern[str]:
    """A regex for TEMPLATE whose named groups match any multi-word value of each slot."""
    pattern = re.escape(TEMPLATE)
    for attribute in ATTRIBUTES:
        slot = re.escape("{" + attribute + "}")
        pattern = pattern.replace(slot, f"(?P<{attribute}>[a-z]+(?: [a-z]+)*?)")
    return re.compile(f"^{pattern}$")


_CAPTION_RE = _template_regex()
_TEMPLATE_WORDS = set(re.sub(r"\{\w+\}", " ", TEMPLATE).split())
_KNOWN_WORDS = _TEMPLATE_WORDS | {w for vocab in VOCABULARIES.values() for v in vocab for w in v.split()}


def _normalise(text: str) -> str:
    """Lower-case, collapse whitespace, drop one trailing full stop."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _unknown_words_error(text: str, unknown: list[str]) -> UserError:
    vocab = "; ".join(f"{a}s: {', '.join(VOCABULARIES[a])}" for a in ATTRIBUTES)
    return UserError(
        f"unknown word(s) {', '.join(repr(w) for w in unknown)} in prompt {text!r}; "
        f"valid {vocab}; prompts read {TEMPLATE!r}"
    )


def parse_caption(text: str) -> ShapeSpec:
    """Parse a prompt in the caption grammar back into a ``ShapeSpec`` (no jitter).

    Strict: case and spacing and a final full stop are forgiven, anything else that does
    not follow ``TEMPLATE`` with words from the vocabularies raises ``UserError``.
    """
    normalised = _normalise(text)
    unknown = [w for w in normalised.split() if w not in _KNOWN_WORDS]
    if unknown:
        raise _unknown_words_error(text, unknown)
    match = _CAPTION_RE.match(normalised)
    if match is None:
        raise UserError(
            f"prompt {text!r} does not follow the caption grammar {TEMPLATE!r}; "
            f"e.g. 'a small red circle in the top left on a blue background'"
        )
    values = match.groupdict()
    for attribute in sorted(ATTRIBUTES, key=match.start):  # report the first bad slot as written
        if values[attribute] not in VOCABULARIES[attribute]:
            valid = ", ".join(VOCABULARIES[attribute])
            raise UserError(
                f"{values[attribute]!r} is not a {attribute} (in prompt {text!r}); valid {attribute}s: {valid}"
            )
    return ShapeSpec(**values)
