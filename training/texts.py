"""The text a training sample is conditioned on (spec §3.2, step 4) and its 77 token ids.

Inference conditions on "prompt + Detail: + facial clauses" (core ``build_facial_prompt``).
Training put the facial clauses *inside* the global caption, after its first sentence, and used
other length limits, so the text is assembled here.  The clause alignment, the marker tokens and
the id rules (marker removed, the noun before it marked, an over-long text cut without its EOS)
are the core's, so a noun marked in training is marked the same way at inference.
"""

from __future__ import annotations

from consistentid_core.prompt.text import (
    CAPTION_SD15,
    CAPTION_SDXL,
    FACIAL_MARKER,
    IMAGE_MARKER,
    MAX_LENGTH,
    FacialPrompt,
    align_caption,
    encode_ids,
    facial_token_ids,
    marked_prompt,
    marked_tokenizer,
)

DEFAULT_CAPTION = "a photo of a person"
DEFAULT_FACIAL_CAPTION = {"sd15": CAPTION_SD15, "sdxl": CAPTION_SDXL, "custom": CAPTION_SD15}
# The training script gave up on the facial clauses above this many characters (inference: 330).
ALIGNED_CHAR_LIMIT = 340
ALL_PARTS = ("Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip")


def split_first_sentence(caption: str) -> tuple[str, str]:
    """``("A man smiles", " He wears a hat.")`` for "A man smiles. He wears a hat."."""
    head, dot, tail = caption.partition(".")
    return head, tail if dot else ""


def assemble_text(caption: str, aligned: str, tokenizer) -> tuple[str, bool]:
    """The training text and whether the caption-last fallback was needed.

    ``tokenizer`` must already know the marker tokens (:func:`marked_tokenizer`), so that each
    ``<|facial|>`` counts as one token, as it did when the limit was checked in training.
    """
    if len(aligned) > ALIGNED_CHAR_LIMIT:
        return caption, False
    first, rest = split_first_sentence(caption)
    text = "Caption:" + first + " Detail:" + aligned + rest[:-1]
    if len(encode_ids(tokenizer, text)) <= MAX_LENGTH:
        return text, False
    return "Detail:" + aligned + " Caption:" + caption, True


def training_prompt(caption: str, facial_caption: str, parts, tokenizer) -> FacialPrompt:
    """The facial prompt of one training sample; ``parts`` are region names in region-image order.

    ``FacialPrompt.parts`` keeps only the regions whose word the facial caption contains, in the
    same order, so region slot ``i`` feeds the ``i``-th marked token (for ``i < num_facial_tokens``).
    """
    for what, value in (("caption", caption), ("facial caption", facial_caption)):
        if FACIAL_MARKER in value or IMAGE_MARKER in value:
            raise ValueError(f"the {what} must not contain {FACIAL_MARKER} or {IMAGE_MARKER}: {value[:80]!r}")
    tok = marked_tokenizer(tokenizer)
    facial_id = int(tok.convert_tokens_to_ids(FACIAL_MARKER))
    aligned, kept = align_caption(facial_caption, list(parts))
    text, fallback = assemble_text(caption, aligned, tok)
    if FACIAL_MARKER not in text:
        kept = []
    return marked_prompt(tok, text, kept, facial_id, fallback)


def empty_prompt(tokenizer) -> FacialPrompt:
    """The dropped-text condition: "" with no facial tokens (the 10 % unconditional samples)."""
    tok = marked_tokenizer(tokenizer)
    facial_id = int(tok.convert_tokens_to_ids(FACIAL_MARKER))
    ids, mask, _ = facial_token_ids(tok, "", facial_id)
    return FacialPrompt(ids, mask, "", "", [], [], 0, False, False, facial_id)


def caption_issue(caption: str, facial_caption: str, tokenizer) -> str | None:
    """What happens to an over-long caption pair, worst case (all five regions present), or None."""
    prompt = training_prompt(caption, facial_caption, ALL_PARTS, tokenizer)
    aligned, _ = align_caption(facial_caption, list(ALL_PARTS))
    if len(aligned) > ALIGNED_CHAR_LIMIT:
        return f"facial caption gives {len(aligned)} characters of clauses (> {ALIGNED_CHAR_LIMIT}): trained without facial tokens"
    if prompt.used_fallback or prompt.truncated:
        cut = ", cut to 77 tokens" if prompt.truncated else ""
        lost = prompt.num_facial_tokens < len(prompt.parts)
        extra = f", {len(prompt.parts) - prompt.num_facial_tokens} facial token(s) lost" if lost else ""
        return f"caption over the {MAX_LENGTH}-token limit: facial details put first{cut}{extra}"
    return None
