"""Reader for Universal NER's IOB2 files (and anything in the same column format).

    # sent_id = en_ewt-ud-train-0001        comment lines start with '#'
    # text = What if Google Morphed ...
    1<TAB>What<TAB>O<TAB>-<TAB>-              index, token, tag, then optional extra columns
    2<TAB>if<TAB>O
    3<TAB>Google<TAB>B-ORG
                                             a blank line ends a sentence

Columns are tab-separated (a token may contain spaces). The token and tag columns are configurable
(0-based); when `index_col` is set, it must count 1, 2, 3, ... within each sentence. Tags must be `O` or
`B-TYPE` / `I-TYPE`. Every problem raises IOB2FormatError naming the file and the 1-based line.
A leading UTF-8 byte order mark is dropped. Lines end at \n, \r\n or \r only (not at U+2028, U+0085, \v, \f,
... as `str.splitlines` would), so line numbers are an editor's and such characters stay inside their token.
A sequence that starts a span with `I-` is accepted (evaluation treats it as seqeval does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from metalm.storage import is_url, open_store

TAG_RE = re.compile(r"^(O|[BI]-\S+)$")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
BOM = "\ufeff"


class IOB2FormatError(ValueError):
    pass


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    sent_id: str | None = None
    line: int = 0  # 1-based line of the sentence's first token
    comments: list[str] = field(default_factory=list)


def _open_text(path: str | Path) -> str:
    p = str(path)
    if is_url(p):  # bytes: no newline translation, line breaks are parse_iob2's
        head, _, name = p.rpartition("/")
        data = open_store(head).read_bytes(name)
    else:
        data = Path(p).read_bytes()
    return data.decode("utf-8")  # a leading BOM is kept here and dropped by parse_iob2 (exactly one)


def read_iob2(path: str | Path, token_col: int = 1, tag_col: int = 2, index_col: int | None = 0) -> list[Sentence]:
    """All sentences of an IOB2 file, in file order."""
    try:
        text = _open_text(path)
    except UnicodeDecodeError as e:
        raise IOB2FormatError(f"{path}: not UTF-8 text ({e})") from None
    except FileNotFoundError:
        raise IOB2FormatError(f"{path}: no such file") from None
    return parse_iob2(text, str(path), token_col, tag_col, index_col)


def parse_iob2(text: str, name: str = "<string>", token_col: int = 1, tag_col: int = 2,
               index_col: int | None = 0) -> list[Sentence]:
    need = max(token_col, tag_col, index_col if index_col is not None else 0) + 1
    if text.startswith(BOM):
        text = text[1:]
    sentences: list[Sentence] = []
    cur: Sentence | None = None
    pending_comments: list[str] = []

    def close() -> None:
        nonlocal cur
        if cur is not None:
            sentences.append(cur)
            cur = None

    for lineno, line in enumerate(LINE_BREAK.split(text), start=1):
        if not line.strip():
            close()
            continue
        if line.startswith("#"):
            if cur is not None:  # a comment inside a sentence ends it (UNER never does this; be lenient)
                close()
            pending_comments.append(line)
            continue
        cols = line.split("\t")
        if len(cols) < need:
            raise IOB2FormatError(
                f"{name}:{lineno}: expected at least {need} tab-separated columns (token in column {token_col}, "
                f"tag in column {tag_col}), found {len(cols)}: {line!r}")
        token, tag = cols[token_col], cols[tag_col].strip()  # tokens may be whitespace (e.g. U+3000)
        if not token:
            raise IOB2FormatError(f"{name}:{lineno}: empty token in column {token_col}: {line!r}")
        if not TAG_RE.match(tag):
            raise IOB2FormatError(f"{name}:{lineno}: tag {tag!r} is not IOB2 (expected O, B-TYPE or I-TYPE)")
        if cur is None:
            sent_id = None
            for c in pending_comments:
                m = re.match(r"^#\s*sent_id\s*=\s*(.*)$", c)
                if m:
                    sent_id = m.group(1).strip()
            cur = Sentence([], [], sent_id, lineno, pending_comments)
            pending_comments = []
        if index_col is not None:
            idx = cols[index_col].strip()
            if not idx.isdecimal():  # not isdigit(): '²' is a digit that int() refuses
                raise IOB2FormatError(f"{name}:{lineno}: index column {index_col} is {idx!r}, expected an integer")
            if int(idx) != len(cur.tokens) + 1:
                raise IOB2FormatError(
                    f"{name}:{lineno}: token index {idx} out of order (expected {len(cur.tokens) + 1}); "
                    "is a blank line missing between sentences?")
        cur.tokens.append(token)
        cur.tags.append(tag)
    close()
    return sentences
