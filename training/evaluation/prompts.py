"""The evaluation prompt protocol: 45 prompts per identity in four groups.

ConsistentID evaluates on 45 prompts per identity in the FastComposer/PhotoMaker style, split into
clothing & accessory, background, action and style prompts (spec section 6).  Its prompt CSV was
published only as rows for 15 celebrities, so the wording here is this project's own; what is kept
is the protocol: the group sizes below, one subject noun per prompt, short sentences that leave
the face visible, no trigger word.

Group sizes: clothing & accessory 12, background 12, action 11, style 10 (45 in all).

``{class}`` is the placeholder for the class word ("man", "woman", "person", ...).
"""

from __future__ import annotations

from dataclasses import dataclass

CLASS_PLACEHOLDER = "{class}"

CLOTHING = (
    "a {class} wearing a red scarf",
    "a {class} wearing a black leather jacket",
    "a {class} wearing a wide-brimmed straw hat",
    "a {class} wearing round glasses",
    "a {class} in a navy blue business suit",
    "a {class} wearing a yellow raincoat",
    "a {class} in a white chef's uniform",
    "a {class} wearing a knitted winter beanie",
    "a {class} wearing a denim shirt",
    "a {class} in a knight's silver armour",
    "a {class} wearing headphones around the neck",
    "a {class} wearing a green hoodie",
)

BACKGROUND = (
    "a {class} in the snow",
    "a {class} on a sandy beach at sunset",
    "a {class} in a dense green forest",
    "a {class} on a busy city street at night",
    "a {class} in front of the Eiffel Tower",
    "a {class} in a cosy library",
    "a {class} on a mountain summit",
    "a {class} in a field of sunflowers",
    "a {class} inside a modern kitchen",
    "a {class} in front of a graffiti wall",
    "a {class} under cherry blossoms",
    "a {class} in a desert with sand dunes",
)

ACTION = (
    "a {class} playing guitar",
    "a {class} reading a book",
    "a {class} drinking a cup of coffee",
    "a {class} riding a bicycle",
    "a {class} cooking pasta",
    "a {class} holding an umbrella in the rain",
    "a {class} painting on a canvas",
    "a {class} laughing with arms crossed",
    "a {class} walking a dog",
    "a {class} typing on a laptop",
    "a {class} swimming in a pool",
)

STYLE = (
    "a watercolor painting of a {class}",
    "an oil painting of a {class} in the style of Rembrandt",
    "a pencil sketch of a {class}",
    "a {class} in the style of a Pixar character",
    "a pop art portrait of a {class}",
    "a black and white photograph of a {class}",
    "an anime drawing of a {class}",
    "a cubist painting of a {class}",
    "a {class} as a marble statue",
    "a {class} in a stained glass window",
)

GROUPS: dict[str, tuple[str, ...]] = {
    "clothing & accessory": CLOTHING,
    "background": BACKGROUND,
    "action": ACTION,
    "style": STYLE,
}

# Short names used in file names and CSV columns, where spaces and "&" are awkward.
GROUP_KEYS: dict[str, str] = {
    "clothing & accessory": "clothing",
    "background": "background",
    "action": "action",
    "style": "style",
}


@dataclass(frozen=True)
class ProtocolPrompt:
    index: int       # 0..44, the position in the protocol (file names use it)
    group: str       # one of GROUPS
    template: str    # with the {class} placeholder

    def text(self, class_word: str) -> str:
        return fill(self.template, class_word)


def fill(template: str, class_word: str) -> str:
    word = class_word.strip()
    if not word:
        raise ValueError("the class word is empty; use e.g. 'man', 'woman' or 'person'")
    # str.replace, not str.format: other braces in a user's prompt must survive untouched.
    return template.replace(CLASS_PLACEHOLDER, word)


def protocol_prompts() -> list[ProtocolPrompt]:
    """All 45 prompts in group order (clothing, background, action, style)."""
    out: list[ProtocolPrompt] = []
    for group, templates in GROUPS.items():
        for template in templates:
            out.append(ProtocolPrompt(len(out), group, template))
    return out


def group_sizes() -> dict[str, int]:
    return {group: len(templates) for group, templates in GROUPS.items()}
