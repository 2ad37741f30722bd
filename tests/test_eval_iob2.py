"""IOB2 (Universal NER format) reader: the real Japanese files and every error path."""
from collections import Counter
from pathlib import Path

import pytest

from metalm.eval.iob2 import IOB2FormatError, parse_iob2, read_iob2

NER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ner"


def test_parses_comments_sentences_and_columns():
    text = ("# sent_id = s1\n# text = Ann met Bob\n1\tAnn\tB-PER\t-\t-\n2\tmet\tO\t-\t-\n3\tBob\tB-PER\t-\t-\n\n\n"
            "# sent_id = s2\r\n1\tNew York\tB-LOC\r\n2\t.\tO\r\n")
    sents = parse_iob2(text, "x.iob2")
    assert [s.sent_id for s in sents] == ["s1", "s2"]
    assert sents[0].tokens == ["Ann", "met", "Bob"] and sents[0].tags == ["B-PER", "O", "B-PER"]
    assert sents[1].tokens == ["New York", "."]  # spaces inside a token survive (tab-separated columns)
    assert sents[0].line == 3 and sents[1].line == 9
    assert sents[1].tags == ["B-LOC", "O"]


def test_configurable_columns():
    sents = parse_iob2("B-ORG foo Acme\nO foo runs\n".replace(" ", "\t"), token_col=2, tag_col=0, index_col=None)
    assert sents[0].tokens == ["Acme", "runs"] and sents[0].tags == ["B-ORG", "O"]


@pytest.mark.parametrize("text,line,fragment", [
    ("1\tAnn\tB-PER\n2\tmet\tB_PER\n", 2, "is not IOB2"),
    ("1\tAnn\tB-PER\n2\tmet\n", 2, "expected at least 3 tab-separated columns"),
    ("# c\n1\tAnn\tE-PER\n", 2, "is not IOB2"),
    ("1\tAnn\tB-\n", 1, "is not IOB2"),
    ("1\tAnn\tO\n3\tmet\tO\n", 2, "out of order"),
    ("1\tAnn\tO\nx\tmet\tO\n", 2, "expected an integer"),
    ("1\tAnn\tO\n2\t\tO\n", 2, "empty token"),
])
def test_errors_name_file_and_line(text, line, fragment):
    with pytest.raises(IOB2FormatError) as e:
        parse_iob2(text, "bad.iob2")
    assert f"bad.iob2:{line}:" in str(e.value) and fragment in str(e.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(IOB2FormatError, match="no such file"):
        read_iob2(tmp_path / "nope.iob2")
    p = tmp_path / "latin1.iob2"
    p.write_bytes("1\tcaf\xe9\tO\n".encode("latin-1"))
    with pytest.raises(IOB2FormatError, match="not UTF-8"):
        read_iob2(p)


def test_real_japanese_files():
    if not (NER_DIR / "ja_hironsan-train.iob2").is_file():
        pytest.skip(f"shared NER data not found at {NER_DIR} (see /work/shared/data/README.md)")
    train = read_iob2(NER_DIR / "ja_hironsan-train.iob2")
    dev = read_iob2(NER_DIR / "ja_hironsan-dev.iob2")
    test = read_iob2(NER_DIR / "ja_hironsan-test.iob2")
    assert (len(train), len(dev), len(test)) == (400, 50, 50)  # README: 500 sentences split 400/50/50
    assert train[0].sent_id == "ja_hironsan-train-0001"
    assert train[0].tokens[7:11] == ["南アフリカ", "共和", "国", "ダーバン"]
    assert train[0].tags[7:11] == ["B-LOC", "I-LOC", "I-LOC", "I-LOC"]
    # counts from `cut -f3 ja_hironsan-train.iob2 | sort | uniq -c`
    assert Counter(t for s in train for t in s.tags) == {
        "O": 11475, "B-LOC": 289, "I-LOC": 139, "B-ORG": 203, "I-ORG": 181, "B-PER": 162, "I-PER": 131}
    assert "\u3000" in {t for s in train for t in s.tokens}  # an ideographic-space token is a real token


# ------------------------------------------------------------------------------------------------ BOM, line breaks
UNER = "# sent_id = s1\n# text = Ann met Bob\n1\tAnn\tB-PER\n2\tmet\tO\n3\tBob\tB-PER\n"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_leading_utf8_bom_is_not_part_of_the_first_line(tmp_path, newline):
    p = tmp_path / "bom.iob2"
    p.write_bytes(b"\xef\xbb\xbf" + UNER.replace("\n", newline).encode("utf-8"))
    sents = read_iob2(p)
    assert [s.sent_id for s in sents] == ["s1"] and sents[0].tokens == ["Ann", "met", "Bob"]
    assert sents[0].comments[0] == "# sent_id = s1"
    # a file that starts with a token line: no BOM glued to the index column
    p.write_bytes(b"\xef\xbb\xbf1\tAnn\tB-PER\n")
    assert read_iob2(p)[0].tokens == ["Ann"]
    # a string handed to parse_iob2 directly (e.g. read by a caller with encoding="utf-8")
    assert parse_iob2("\ufeff" + UNER, "x.iob2")[0].sent_id == "s1"
    # exactly one BOM is dropped: a second one is data, and here it spoils the index column of line 1
    p.write_bytes(b"\xef\xbb\xbf" * 2 + b"1\tAnn\tB-PER\n")
    with pytest.raises(IOB2FormatError, match=r"bom\.iob2:1: index column 0 is '\\ufeff1', expected an integer"):
        read_iob2(p)


def test_only_a_leading_bom_is_stripped():
    """U+FEFF elsewhere is data (a zero-width no-break space inside a token), and the first line is still line 1."""
    sents = parse_iob2("\ufeff1\ta\ufeffb\tO\n", "x.iob2")
    assert sents[0].tokens == ["a\ufeffb"] and sents[0].line == 1
    with pytest.raises(IOB2FormatError, match=r"^x\.iob2:1: tag 'B_X' is not IOB2"):
        parse_iob2("\ufeff1\tAnn\tB_X\n", "x.iob2")


@pytest.mark.parametrize("odd", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_only_lf_crlf_and_cr_end_a_line(odd):
    """str.splitlines also splits on U+2028, U+0085, \\v, \\f, ...: those stay inside the token, and an error on a
    later line names the line an editor shows."""
    text = f"1\tAnn\tB-PER\n2\tx{odd}y\tO\n3\tBob\tB_PER\n"
    with pytest.raises(IOB2FormatError) as e:
        parse_iob2(text, "odd.iob2")
    assert str(e.value).startswith("odd.iob2:3: tag 'B_PER' is not IOB2")
    sents = parse_iob2(text.replace("B_PER", "B-PER"), "odd.iob2")
    assert len(sents) == 1 and sents[0].tokens == ["Ann", f"x{odd}y", "Bob"]


def test_line_numbers_with_mixed_line_endings(tmp_path):
    r"""\n, \r\n and a lone \r each end one line (and \r\n is one break, not two)."""
    text = "1\tAnn\tO\r\n2\tmet\tO\r3\tBob\tO\n\n1\tx\tO\r\n2\ty\tB_X\n"
    with pytest.raises(IOB2FormatError, match=r"^mixed\.iob2:6: tag 'B_X'"):
        parse_iob2(text, "mixed.iob2")
    p = tmp_path / "mixed.iob2"
    p.write_bytes(text.replace("B_X", "O").encode())  # bytes: no newline translation on the way in
    sents = read_iob2(p)
    assert [s.tokens for s in sents] == [["Ann", "met", "Bob"], ["x", "y"]] and [s.line for s in sents] == [1, 5]
