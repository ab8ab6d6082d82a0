"""Prompt side of ConsistentID: the facial caption, its ``<|facial|>`` markers and the 77 token ids.

The released weights were trained on text built by one exact procedure, so everything here
reproduces the official behaviour, quirks included:

* the caption is re-ordered into clauses "face, ears, eyes, nose, mouth" while the region images
  stay in parse order (face, eye, ear, nose, lip), so the eye image lands on the "ears" token;
* a part whose word is missing from the caption is dropped (the old template has no "face");
* prompts too long for 77 tokens put the caption first and are cut without their EOS;
* SDXL's second tokenizer never learns ``<|facial|>`` and so sees it as five BPE pieces.

Tokenizers are Hugging Face CLIP tokenizers owned by the caller. The official code adds its
marker tokens to the pipeline's tokenizer; here that happens on a private copy so that the
caller's tokenizer (often shared with the rest of ComfyUI) keeps its vocabulary.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..constants import MAX_REGIONS
from ..errors import PromptError

logger = logging.getLogger("consistentid")

CAPTION_SD15 = "The person has one face, one nose, two eyes, two ears, and one mouth."
CAPTION_SD15_OLD = "The person has one nose, two eyes, two ears, and a mouth."
CAPTION_SDXL = "The person has one face, one nose, two eyes, two ears, and a mouth."
CAPTIONS = {
    "official SD1.5": CAPTION_SD15,
    "official SD1.5 (before 2024-08, HF Space)": CAPTION_SD15_OLD,
    "official SDXL": CAPTION_SDXL,
}
"""The facial captions a user can choose by name; ``auto`` picks the official one of the model."""

FACIAL_MARKER = "<|facial|>"
IMAGE_MARKER = "<|image|>"

FACE = "Face"
LEFT_EYE = "Left_Eye"
RIGHT_EYE = "Right_Eye"
LEFT_EAR = "Left_Ear"
RIGHT_EAR = "Right_Ear"
NOSE = "Nose"
UPPER_LIP = "Upper_Lip"
LOWER_LIP = "Lower_Lip"

# The official key list; its order (ears before eyes) fixes the order of the facial tokens.
REGION_ORDER = (FACE, LEFT_EAR, RIGHT_EAR, LEFT_EYE, RIGHT_EYE, NOSE, UPPER_LIP, LOWER_LIP)
REGION_WORD = {
    FACE: "face",
    LEFT_EAR: "ears",
    RIGHT_EAR: "ears",
    LEFT_EYE: "eyes",
    RIGHT_EYE: "eyes",
    NOSE: "nose",
    UPPER_LIP: "mouth",
    LOWER_LIP: "mouth",
}
FEATURE_WORDS = ("face", "ears", "eyes", "nose", "mouth")

MAX_LENGTH = 77
CAPTION_CHAR_LIMIT = 330
SEPARATORS = {"sd15": "Detail:", "sdxl": "; Detail:"}

_WORD_RE = re.compile(r"\b\w+\b|[.,;!?]")
_CLAUSE_DELIMITERS = ",.;"


def _word_marker(word: str) -> str:
    return f"<|{word}|>"


def _region_names(parts: Iterable[str]) -> list[str]:
    if isinstance(parts, str):
        raise PromptError(f"parts must be a list of region names, not the single string {parts!r}")
    names = list(parts.keys() if isinstance(parts, Mapping) else parts)
    for name in names:
        if name not in REGION_WORD:
            raise PromptError(
                f"unknown facial region {name!r}; use the official names {', '.join(REGION_ORDER)}"
            )
    if len(set(names)) != len(names):
        raise PromptError(f"facial regions are listed more than once: {names}")
    return names


def _dedup_keywords(caption: str) -> str:
    # A repeated keyword is blanked rather than removed, so its slot survives as a double space.
    seen: set[str] = set()
    pieces = []
    for piece in _WORD_RE.findall(caption):
        if piece in FEATURE_WORDS:
            if piece in seen:
                piece = ""
            else:
                seen.add(piece)
        pieces.append(piece)
    return " ".join(pieces)


def align_caption(caption: str, parts: Iterable[str] | Mapping[str, Any]) -> tuple[str, Any]:
    """Mark the nouns of ``caption`` that name a present region and keep only their clauses.

    Returns ``(aligned_text, kept_parts)``. ``kept_parts`` is ``parts`` without the regions
    whose word is missing from the caption, in the caller's order: a dict (same values) when a
    mapping was given, else a list of names. ``parts`` itself is never modified.
    """
    names = _region_names(parts)
    text = _dedup_keywords(caption)

    present = set(names)
    words: list[str] = []
    for region in REGION_ORDER:
        word = REGION_WORD[region]
        if region in present and word not in words:
            words.append(word)

    # Back to front, as the official code does; each marker goes right after its noun.
    missing: set[str] = set()
    for word in reversed(words):
        pattern = re.compile(rf"\b{word}\b")
        if pattern.search(text) is None:
            missing.add(word)
            continue
        text = pattern.sub(f"{word} {_word_marker(word)}", text, count=1)

    clauses = []
    for word in words:
        if word in missing:
            continue
        at = text.find(_word_marker(word))
        if at < 0:
            # Its clause was already taken along with an earlier marker.
            continue
        start = max(text.rfind(d, 0, at) for d in _CLAUSE_DELIMITERS) + 1
        ends = [e for e in (text.find(d, at) for d in _CLAUSE_DELIMITERS) if e >= 0]
        end = min(ends) if ends else len(text)
        clauses.append(text[start:end].strip() + ",")
        text = text[:start] + text[end:]

    aligned = " ".join(clauses)
    for word in words:
        aligned = aligned.replace(_word_marker(word), FACIAL_MARKER)

    if missing:
        logger.debug("caption has no %s; dropping those regions", sorted(missing))
    if isinstance(parts, Mapping):
        kept: Any = {k: v for k, v in parts.items() if REGION_WORD[k] not in missing}
    else:
        kept = [n for n in names if REGION_WORD[n] not in missing]
    return aligned, kept


_copies: "weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Any]]" = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()


def marked_tokenizer(tokenizer: Any, markers: tuple[str, ...] = (IMAGE_MARKER, FACIAL_MARKER)) -> Any:
    """A private copy of ``tokenizer`` with ``markers`` added as special tokens, one call each.

    Adding ``<|image|>`` then ``<|facial|>`` to the 49408-entry CLIP vocabulary gives them the
    ids 49408 and 49409, which the released weights rely on. The copy is cached per tokenizer
    object; treat it as read-only.
    """
    markers = tuple(markers)

    def make() -> Any:
        clone = copy.deepcopy(tokenizer)
        for marker in markers:
            clone.add_tokens([marker], special_tokens=True)
        return clone

    with _copies_lock:
        try:
            per_tokenizer = _copies.setdefault(tokenizer, {})
        except TypeError:
            # Not weak-referenceable or not hashable: still correct, just not cached.
            return make()
        clone = per_tokenizer.get(markers)
        if clone is None:
            clone = per_tokenizer[markers] = make()
        return clone


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: over-long prompts are expected here and handled below.
    return list(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        raise PromptError(f"{type(tokenizer).__name__} has no pad token; a CLIP tokenizer is expected")
    return int(pad)


def _drop_markers(ids: list[int], facial_id: int) -> tuple[list[int], list[bool]]:
    # The marker itself is removed; the token before it (the noun) is the one that gets fused.
    clean: list[int] = []
    mask: list[bool] = []
    for token in ids:
        if token == facial_id:
            mask[len(clean) - 1] = True
        else:
            clean.append(token)
            mask.append(False)
    return clean, mask


def _fit(ids: list[int], mask: list[bool], pad_id: int) -> tuple[list[int], list[bool], bool]:
    # Plain slicing on purpose: the official code loses the EOS of over-long prompts.
    if len(ids) > MAX_LENGTH:
        return ids[:MAX_LENGTH], mask[:MAX_LENGTH], True
    fill = MAX_LENGTH - len(ids)
    return ids + [pad_id] * fill, mask + [False] * fill, False


def facial_token_ids(tok: Any, text: str, facial_id: int) -> tuple[list[int], list[bool], bool]:
    """(77 ids, which of them are fused, whether the text was cut) of a text with facial markers.

    ``tok`` is a :func:`marked_tokenizer`.  Each marker is removed and the token before it marked;
    an over-long text is cut without its EOS and a short one padded, as the official code does.
    Training (``training/texts.py``) builds its ids with this too, so that a noun marked in
    training is marked the same way at inference.
    """
    clean, mask = _drop_markers(encode_ids(tok, text), facial_id)
    return _fit(clean, mask, _pad_id(tok))


@dataclass(frozen=True)
class FacialPrompt:
    """The 77 token ids of a facial prompt and where its region embeddings are fused.

    Region ``parts[i]`` is fused into the token at ``token_positions[i]`` for
    ``i < num_facial_tokens``; any further parts are encoded but unused, as in the official code.
    """

    input_ids: list[int]
    token_mask: list[bool]
    text_only: str
    text: str
    parts: list[str]
    token_positions: list[int]
    num_facial_tokens: int
    truncated: bool
    used_fallback: bool
    facial_token_id: int

    def valid_mask(self, n: int = MAX_REGIONS) -> list[bool]:
        """Which of ``n`` region slots feed a facial token: the first ``num_facial_tokens``."""
        if self.num_facial_tokens > n:
            raise PromptError(f"{self.num_facial_tokens} facial tokens do not fit in {n} region slots")
        return [True] * self.num_facial_tokens + [False] * (n - self.num_facial_tokens)


def build_facial_prompt(
    prompt: str,
    parts: Iterable[str],
    tokenizer: Any,
    caption: str = CAPTION_SD15,
    arch: str = "sd15",
) -> FacialPrompt:
    """Build the official ``clean_ids`` for ``prompt`` plus the facial caption of ``parts``.

    ``parts`` are official region names in the order of their region images. ``tokenizer`` is
    the (first) CLIP tokenizer; it is not modified. ``arch`` picks the separator: "sd15" or "sdxl".
    """
    if arch not in SEPARATORS:
        raise PromptError(f"arch must be one of {sorted(SEPARATORS)}, got {arch!r}")
    for what, value in (("prompt", prompt), ("caption", caption)):
        if FACIAL_MARKER in value or IMAGE_MARKER in value:
            # Extra markers would mark tokens that have no region image behind them.
            raise PromptError(f"the {what} must not contain {FACIAL_MARKER} or {IMAGE_MARKER}")

    tok = marked_tokenizer(tokenizer)
    facial_id = int(tok.convert_tokens_to_ids(FACIAL_MARKER))
    aligned, kept = align_caption(caption, parts)
    separator = SEPARATORS[arch]

    used_fallback = False
    if len(caption) > CAPTION_CHAR_LIMIT:
        logger.debug("facial caption longer than %d characters; using the prompt alone", CAPTION_CHAR_LIMIT)
        text = prompt
    else:
        text = prompt + separator + aligned
        if len(encode_ids(tok, text)) > MAX_LENGTH:
            logger.debug("prompt plus facial caption exceed %d tokens; putting the caption first", MAX_LENGTH)
            text = separator + aligned + " Caption:" + prompt
            used_fallback = True

    facial_prompt = marked_prompt(tok, text, kept, facial_id, used_fallback)
    if facial_prompt.truncated:
        logger.debug("facial prompt cut to %d tokens (EOS dropped)", MAX_LENGTH)
    return facial_prompt


def marked_prompt(tok: Any, text: str, parts, facial_id: int, used_fallback: bool = False) -> FacialPrompt:
    """The :class:`FacialPrompt` of a text with facial markers (ids by :func:`facial_token_ids`); ``parts``
    are the region names in slot order.  Inference and training build their prompts through this."""
    ids, mask, truncated = facial_token_ids(tok, text, facial_id)
    positions = [i for i, marked in enumerate(mask) if marked]
    return FacialPrompt(
        input_ids=ids,
        token_mask=mask,
        text_only=text.replace(FACIAL_MARKER, "").replace(IMAGE_MARKER, ""),
        text=text,
        parts=list(parts),
        token_positions=positions,
        num_facial_tokens=len(positions),
        truncated=truncated,
        used_fallback=used_fallback,
        facial_token_id=facial_id,
    )


def second_encoder_ids(facial_prompt: FacialPrompt, tokenizer_2: Any) -> list[int]:
    """SDXL ``clean_ids2``: the facial prompt as the bigG tokenizer sees it.

    Only ``<|image|>`` is added to ``tokenizer_2``, so each ``<|facial|>`` stays in the ids as
    the pieces ``<``, ``|``, ``facial``, ``|``, ``>``; the marker walk looks for tokenizer 1's
    facial id, which cannot occur. The facial token positions therefore come from
    ``facial_prompt`` and no longer line up with these ids; the released SDXL model expects that.
    """
    tok = marked_tokenizer(tokenizer_2, (IMAGE_MARKER,))
    clean, mask = _drop_markers(encode_ids(tok, facial_prompt.text), facial_prompt.facial_token_id)
    ids, _, _ = _fit(clean, mask, _pad_id(tok))
    return ids


def plain_ids(
    text: str,
    tokenizer: Any,
    markers: tuple[str, ...] = (IMAGE_MARKER, FACIAL_MARKER),
) -> list[int]:
    """Ordinary 77-token ids of ``text`` (text-only and negative prompts).

    Unlike the facial prompt, truncation here keeps EOS at index 76. ``markers`` are the tokens
    the official pipeline had added to this tokenizer; pass ``(IMAGE_MARKER,)`` for SDXL's
    ``tokenizer_2``.
    """
    tok = marked_tokenizer(tokenizer, markers)
    encoded = tok(text, max_length=MAX_LENGTH, padding="max_length", truncation=True)
    return list(encoded["input_ids"])


def resolve_caption(choice: str, custom: str, arch: str) -> str:
    """The caption for a choice of :data:`CAPTIONS`, ``auto`` (the official one for ``arch``) or ``custom``."""
    if choice == "auto":
        return CAPTION_SDXL if arch == "sdxl" else CAPTION_SD15
    if choice == "custom":
        if not custom.strip():
            raise PromptError("caption is 'custom' but custom_caption is empty")
        return custom
    return CAPTIONS[choice]
