"""The text form that deduplication and the quality classifier compare (MiniCPM4 report section 2.2.1):
blank lines and runs of spaces collapsed, diacritics stripped, lowercase. Documents keep their own text; only
the hashes, shingles and scores are computed on this form.
"""

import re
import unicodedata

_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_BLANK_LINES = re.compile(r"\n\s*\n+")


def normalise(text: str) -> str:
    """`text` lowercased, without combining marks (after NFKD), each run of spaces/tabs one space, each run
    of blank lines one newline, stripped at both ends.
    """
    if not text.isascii():  # ASCII has neither compatibility forms nor combining marks
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    collapsed = _BLANK_LINES.sub("\n", _SPACES.sub(" ", text.lower()))
    return "\n".join(line.strip() for line in collapsed.split("\n")).strip()
