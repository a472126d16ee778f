"""Turn one input (bytes of a file or a download) into clean text; ``cartridges.corpus`` walks them.

``loaders`` knows file formats and text cleaning, ``fetch`` knows http(s). Neither knows about
directories, policies or tokenizers.
"""

from cartridges.documents.fetch import fetch_url
from cartridges.documents.loaders import (
    SUFFIXES,
    Unusable,
    decode_text,
    normalise_text,
    parse_document,
)

__all__ = [
    "SUFFIXES",
    "Unusable",
    "decode_text",
    "fetch_url",
    "normalise_text",
    "parse_document",
]
