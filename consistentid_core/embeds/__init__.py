"""Embeds: what the face encoder produces per reference photo (``face_embeds``), and their files
(``files``).  The names below are the package's public interface."""

from .face_embeds import COMBINE_METHODS, FaceEmbeds, combine_embeds, concat_embeds
from .files import EXTENSION, TEMP_PREFIX, load_embeds, resolve_inside, save_embeds, save_numbered_embeds

__all__ = [
    "COMBINE_METHODS", "EXTENSION", "TEMP_PREFIX", "FaceEmbeds", "combine_embeds", "concat_embeds", "load_embeds",
    "resolve_inside", "save_embeds", "save_numbered_embeds",
]
