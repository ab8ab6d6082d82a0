"""Facial caption alignment and token ids against the exact facts of spec §2.5, §4 and §8.2.

Everything runs on the real CLIP BPE vocabulary (see clip_vocab.py), so the ids asserted here
are the ids the released weights were trained with.
"""

import pytest

from clip_vocab import VOCAB_SIZE, sd15_tokenizer, sdxl_tokenizer_2
from consistentid_core.errors import PromptError
from consistentid_core.prompt.text import (
    CAPTION_SD15,
    CAPTION_SD15_OLD,
    CAPTION_SDXL,
    FACIAL_MARKER,
    IMAGE_MARKER,
    align_caption,
    build_facial_prompt,
    marked_tokenizer,
    plain_ids,
    second_encoder_ids,
)

BOS, EOS = 49406, 49407
FACE, EARS, EYES, NOSE, MOUTH = 1710, 9861, 3095, 8231, 4932
MARKER_PIECES = [27, 347, 11909, 91, 29]  # "<" "|" "facial" "|" ">" in the plain CLIP vocabulary
COMMA = 267

PARSED = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]  # BiSeNet label order, §2.3
PROMPT = "A man, in a forest, adventuring"
INFER_PROMPT = (
    "cinematic photo,A man, in a forest, adventuring, 50mm photograph, half-length portrait, film, "
    "bokeh, professional, 4k, highly detailed"
)
LONG_PROMPT = ", ".join(["a very detailed photo of a person"] * 10)

ALIGNED_NEW = (
    "The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
    "one nose <|facial|>, and one mouth <|facial|>,"
)
ALIGNED_OLD = "two ears <|facial|>, two eyes <|facial|>, The person has one nose <|facial|>, and a mouth <|facial|>,"
ALIGNED_MISSING = (
    "The person has one face <|facial|>, two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>,"
)
ALIGNED_SDXL = (
    "The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
    "one nose <|facial|>, and a mouth <|facial|>,"
)


@pytest.fixture(scope="module", params=["slow", "fast"])
def tok(request):
    return sd15_tokenizer(fast=request.param == "fast")


@pytest.fixture(scope="module")
def tok2():
    return sdxl_tokenizer_2()


def test_vocabulary_matches_released_clip_ids(tok, tok2):
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok("a photo of a face")["input_ids"] == [BOS, 320, 1125, 539, 320, FACE, EOS]
    words = ["face</w>", "ears</w>", "eyes</w>", "nose</w>", "mouth</w>"]
    assert tok.convert_tokens_to_ids(words) == [FACE, EARS, EYES, NOSE, MOUTH]
    assert tok.pad_token_id == EOS
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert tok2("a photo of a face")["input_ids"] == [BOS, 320, 1125, 539, 320, FACE, EOS]


def test_marker_ids(tok, tok2):
    marked = marked_tokenizer(tok)
    assert marked.convert_tokens_to_ids([IMAGE_MARKER, FACIAL_MARKER]) == [49408, 49409]
    marked2 = marked_tokenizer(tok2, (IMAGE_MARKER,))
    assert marked2.convert_tokens_to_ids(IMAGE_MARKER) == 49408
    # §8.2 item 6: unknown in tokenizer_2, so it resolves to unk = EOS.
    assert marked2.convert_tokens_to_ids(FACIAL_MARKER) == EOS
    assert marked_tokenizer(tok) is marked, "the private copy is cached per tokenizer"
    assert marked_tokenizer(tok, (IMAGE_MARKER,)) is not marked


# --- align_caption -------------------------------------------------------------------------------


def test_align_new_template_all_parts():
    assert align_caption(CAPTION_SD15, PARSED) == (ALIGNED_NEW, PARSED)


def test_align_old_template_drops_face():
    aligned, kept = align_caption(CAPTION_SD15_OLD, PARSED)
    assert aligned == ALIGNED_OLD
    assert kept == ["Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]


def test_align_missing_parts():
    parts = ["Face", "Right_Eye", "Nose", "Lower_Lip"]
    assert align_caption(CAPTION_SD15, parts) == (ALIGNED_MISSING, parts)


def test_align_no_parts():
    assert align_caption(CAPTION_SD15, []) == ("", [])


def test_align_does_not_mutate_and_keeps_mapping_values():
    parts = list(PARSED)
    region_images = {name: f"img-{name}" for name in PARSED}
    align_caption(CAPTION_SD15_OLD, parts)
    _, kept = align_caption(CAPTION_SD15_OLD, region_images)
    assert parts == PARSED
    assert list(region_images) == PARSED
    assert kept == {n: f"img-{n}" for n in ["Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]}


def test_align_repeated_keyword_marks_first_only():
    aligned, kept = align_caption("Big eyes, small nose, blue eyes.", ["Left_Eye", "Nose"])
    assert aligned == "Big eyes <|facial|>, small nose <|facial|>,"
    assert kept == ["Left_Eye", "Nose"]


def test_align_two_markers_in_one_clause():
    aligned, _ = align_caption("He has brown eyes and a big nose. He smiles.", ["Left_Eye", "Nose"])
    assert aligned == "He has brown eyes <|facial|> and a big nose <|facial|>,"


@pytest.mark.parametrize("parts", [["Hair"], ["Face", "Face"], "Face"])
def test_align_rejects_bad_parts(parts):
    with pytest.raises(PromptError):
        align_caption(CAPTION_SD15, parts)


# --- build_facial_prompt -------------------------------------------------------------------------


def test_all_parts_new_template(tok):
    fp = build_facial_prompt(PROMPT, PARSED, tok)
    assert fp.text == PROMPT + "Detail:" + ALIGNED_NEW
    assert "adventuringDetail:The person" in fp.text
    assert fp.text_only == fp.text.replace(FACIAL_MARKER, "")
    assert fp.token_positions == [16, 19, 22, 25, 29]
    assert [fp.input_ids[i] for i in fp.token_positions] == [FACE, EARS, EYES, NOSE, MOUTH]
    assert fp.num_facial_tokens == 5 and fp.valid_mask() == [True] * 5
    assert fp.token_mask == [i in fp.token_positions for i in range(77)]
    assert fp.input_ids[:3] == [BOS, 320, 786]
    assert fp.input_ids[31:] == [EOS] * 46  # EOS, then EOS padding
    assert fp.input_ids[30] == COMMA
    assert len(fp.input_ids) == 77
    assert fp.input_ids == plain_ids(fp.text_only, tok)
    assert not fp.truncated and not fp.used_fallback
    assert fp.facial_token_id == 49409


def test_eye_image_goes_to_ears_token(tok):
    fp = build_facial_prompt(PROMPT, PARSED, tok)
    pairs = list(zip(fp.parts, (fp.input_ids[i] for i in fp.token_positions)))
    assert pairs == [("Face", FACE), ("Left_Eye", EARS), ("Left_Ear", EYES), ("Nose", NOSE), ("Upper_Lip", MOUTH)]


def test_infer_prompt_fits_without_fallback(tok):
    fp = build_facial_prompt(INFER_PROMPT, PARSED, tok)
    assert fp.text.startswith(INFER_PROMPT + "Detail:The person")
    assert not fp.used_fallback and not fp.truncated
    assert fp.token_positions == [44, 47, 50, 53, 57]
    assert [fp.input_ids[i] for i in fp.token_positions] == [FACE, EARS, EYES, NOSE, MOUTH]
    assert fp.input_ids[59:] == [EOS] * 18
    assert fp.input_ids == plain_ids(fp.text_only, tok)


def test_old_template(tok):
    fp = build_facial_prompt(PROMPT, PARSED, tok, caption=CAPTION_SD15_OLD)
    assert fp.text == PROMPT + "Detail:" + ALIGNED_OLD
    assert fp.parts == ["Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]
    assert fp.token_positions == [13, 16, 22, 26]
    assert [fp.input_ids[i] for i in fp.token_positions] == [EARS, EYES, NOSE, MOUTH]
    assert fp.valid_mask() == [True, True, True, True, False]
    assert fp.input_ids == plain_ids(fp.text_only, tok)


def test_missing_parts(tok):
    parts = ["Face", "Right_Eye", "Nose", "Lower_Lip"]
    fp = build_facial_prompt(PROMPT, parts, tok)
    assert fp.text == PROMPT + "Detail:" + ALIGNED_MISSING
    assert fp.parts == parts
    assert fp.token_positions == [16, 19, 22, 26]
    assert [fp.input_ids[i] for i in fp.token_positions] == [FACE, EYES, NOSE, MOUTH]
    assert fp.valid_mask() == [True, True, True, True, False]
    assert fp.valid_mask(4) == [True] * 4
    with pytest.raises(PromptError):
        fp.valid_mask(3)


def test_no_parts(tok):
    fp = build_facial_prompt(PROMPT, [], tok)
    assert fp.text == fp.text_only == PROMPT + "Detail:"
    assert fp.num_facial_tokens == 0 and fp.token_positions == [] and fp.parts == []
    assert fp.valid_mask() == [False] * 5
    assert not any(fp.token_mask)
    assert fp.input_ids == [BOS, 320, 786, 267, 530, 320, 4167, 267, 29627, 653, 7657, 281] + [EOS] * 65


def test_long_prompt_falls_back_and_drops_eos(tok):
    assert len(tok(LONG_PROMPT)["input_ids"]) > 77
    fp = build_facial_prompt(LONG_PROMPT, PARSED, tok)
    assert fp.used_fallback and fp.truncated
    assert fp.text == "Detail:" + ALIGNED_NEW + " Caption:" + LONG_PROMPT
    assert fp.token_positions == [7, 10, 13, 16, 20]
    assert [fp.input_ids[i] for i in fp.token_positions] == [FACE, EARS, EYES, NOSE, MOUTH]
    assert len(fp.input_ids) == len(fp.token_mask) == 77
    assert EOS not in fp.input_ids
    assert fp.input_ids[76] == 539  # "of", cut mid-prompt
    plain = plain_ids(fp.text_only, tok)
    assert plain[76] == EOS and plain[:76] == fp.input_ids[:76]
    assert plain != fp.input_ids


def test_caption_first_when_only_the_caption_overflows(tok):
    # The prompt alone fits (55 tokens), the caption does not fit after it. " Caption:" makes
    # the fallback longer still, so it is always cut; caption-first keeps every facial token.
    prompt = ", ".join(["a photo of a person"] * 9)
    assert len(tok(prompt)["input_ids"]) == 55
    fp = build_facial_prompt(prompt, PARSED, tok)
    assert fp.used_fallback and fp.truncated
    assert fp.text.startswith("Detail:The person has one face <|facial|>")
    assert fp.token_positions == [7, 10, 13, 16, 20]
    assert EOS not in fp.input_ids and fp.input_ids[-5:] == [320, 1125, 539, 320, 2533]


def test_caption_over_330_chars_is_not_used(tok):
    long_caption = CAPTION_SD15 + " He looks calm and friendly." * 12
    assert len(long_caption) > 330
    fp = build_facial_prompt(PROMPT, PARSED, tok, caption=long_caption)
    assert fp.text == fp.text_only == PROMPT
    assert fp.num_facial_tokens == 0 and fp.valid_mask() == [False] * 5
    assert fp.input_ids == plain_ids(PROMPT, tok)
    assert not fp.used_fallback


def test_caption_of_exactly_330_chars_is_used(tok):
    caption = CAPTION_SD15 + " " * (330 - len(CAPTION_SD15))
    fp = build_facial_prompt(PROMPT, PARSED, tok, caption=caption)
    assert fp.text == PROMPT + "Detail:" + ALIGNED_NEW
    assert build_facial_prompt(PROMPT, PARSED, tok, caption=caption + " ").num_facial_tokens == 0


def test_sdxl_separator_and_second_tokenizer(tok, tok2):
    fp = build_facial_prompt("A woman wearing a santa hat", PARSED, tok, caption=CAPTION_SDXL, arch="sdxl")
    assert fp.text == "A woman wearing a santa hat; Detail:" + ALIGNED_SDXL
    assert fp.token_positions == [14, 17, 20, 23, 27]
    assert [fp.input_ids[i] for i in fp.token_positions] == [FACE, EARS, EYES, NOSE, MOUTH]
    assert fp.input_ids[29:] == [EOS] * 48

    ids2 = second_encoder_ids(fp, tok2)
    assert len(ids2) == 77
    nouns = [i for i, t in enumerate(ids2) if t in (FACE, EARS, EYES, NOSE, MOUTH)]
    assert nouns == [14, 22, 30, 38, 47]
    for i in nouns:
        assert ids2[i + 1 : i + 7] == MARKER_PIECES + [COMMA]
    assert ids2[54] == EOS and ids2[55:] == [0] * 22
    # Tokenizer 1's positions point elsewhere in the bigG half; the released model expects this.
    assert [ids2[i] for i in fp.token_positions] == [FACE, 11909, COMMA, 27, 29]


def test_sdxl_fallback_and_truncated_second_ids(tok, tok2):
    fp = build_facial_prompt(LONG_PROMPT, PARSED, tok, caption=CAPTION_SDXL, arch="sdxl")
    assert fp.used_fallback
    assert fp.text == "; Detail:" + ALIGNED_SDXL + " Caption:" + LONG_PROMPT
    ids2 = second_encoder_ids(fp, tok2)
    assert len(ids2) == 77 and EOS not in ids2 and 0 not in ids2


def test_plain_ids(tok, tok2):
    assert plain_ids("", tok) == [BOS] + [EOS] * 76
    assert plain_ids("", tok2, (IMAGE_MARKER,)) == [BOS, EOS] + [0] * 75
    long_ids = plain_ids(LONG_PROMPT, tok)
    assert len(long_ids) == 77 and long_ids[0] == BOS and long_ids[76] == EOS


def test_callers_tokenizers_are_left_unmodified(tok, tok2):
    sizes = (len(tok), len(tok2))
    added = (dict(tok.added_tokens_decoder), dict(tok2.added_tokens_decoder))
    fp = build_facial_prompt(PROMPT, PARSED, tok, caption=CAPTION_SDXL, arch="sdxl")
    second_encoder_ids(fp, tok2)
    plain_ids("negative", tok)
    assert (len(tok), len(tok2)) == sizes == (49408, 49408)
    assert (dict(tok.added_tokens_decoder), dict(tok2.added_tokens_decoder)) == added
    for t in (tok, tok2):
        assert FACIAL_MARKER not in t.get_vocab() and IMAGE_MARKER not in t.get_vocab()


def test_parts_are_not_mutated(tok):
    parts = list(PARSED)
    fp = build_facial_prompt(PROMPT, parts, tok, caption=CAPTION_SD15_OLD)
    assert parts == PARSED
    assert fp.parts == PARSED[1:]
    assert fp.parts is not parts


def test_slow_and_fast_agree():
    slow, fast = sd15_tokenizer(), sd15_tokenizer(fast=True)
    for prompt in (PROMPT, INFER_PROMPT, LONG_PROMPT):
        assert build_facial_prompt(prompt, PARSED, slow) == build_facial_prompt(prompt, PARSED, fast)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "a <|facial|> man"},
        {"prompt": "a <|image|> man"},
        {"caption": "one face <|facial|>."},
        {"arch": "sd3"},
    ],
)
def test_rejects_reserved_markers_and_unknown_arch(tok, kwargs):
    args = {"prompt": PROMPT, "parts": PARSED, "tokenizer": tok, **kwargs}
    with pytest.raises(PromptError):
        build_facial_prompt(**args)
