"""The user's documentation stays true to the code.

- docs/configuration.md is exactly what scripts/gen_config_docs.py generates from metalm/config.py;
- every config key, command-line flag, repository path and relative link in the docs exists;
- every error message quoted in docs/troubleshooting.md is one the code can raise.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "launchers" / "slurm" / "README.md"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


gen = _load(REPO / "scripts" / "gen_config_docs.py", "metalm_gen_config_docs")


def _schema_keys() -> set[str]:
    return {r["key"] for r in gen.schema_rows()}


# ================================================================================ configuration reference


def test_configuration_reference_matches_the_schema():
    expected = gen.render()
    path = REPO / "docs" / "configuration.md"
    actual = path.read_text() if path.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/configuration.md", "generated", n=1))[:40])
        pytest.fail("docs/configuration.md disagrees with metalm/config.py; run "
                    f"`python scripts/gen_config_docs.py`:\n{diff}")


def test_generator_check_mode_detects_a_stale_file(tmp_path):
    out = tmp_path / "configuration.md"
    assert gen.main(["--out", str(out)]) == 0
    assert gen.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("| `train.seq_len` | int |", "| `train.seq_len` | str |"))
    assert gen.main(["--check", "--out", str(out)]) == 1


SYNTHETIC_SCHEMA = '''
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class InnerConfig:
    depth: int = 3  # how deep it goes


@dataclass
class SecConfig:
    name: Optional[str] = None  # a name | or none
    mode: str = "a"
    ratio: float = 2.5e-4
    items: list = field(default_factory=lambda: ["x", 1, None])
    flag: bool = True
    inner: InnerConfig = field(default_factory=InnerConfig)
    after: int = 7  # declared after the nested section


@dataclass
class Config:
    sec: SecConfig = field(default_factory=SecConfig)


CHOICES = {"sec.mode": ("a", "b")}
'''


def test_generator_reads_types_defaults_and_trailing_comments(tmp_path):
    path = tmp_path / "synthetic_config.py"
    path.write_text(textwrap.dedent(SYNTHETIC_SCHEMA))
    mod = _load(path, "metalm_synthetic_config")
    rows = {r["key"]: r for r in gen.schema_rows(mod)}
    assert [k for k, r in rows.items() if r["kind"] == "section"] == ["sec", "sec.inner"]
    assert rows["sec.name"] == {"kind": "key", "key": "sec.name", "type": "str or null", "default": "null",
                              "description": "a name | or none"}
    assert rows["sec.mode"]["description"] == "one of a | b"  # no comment: the allowed values
    assert rows["sec.ratio"]["default"] == "0.00025" and rows["sec.ratio"]["type"] == "float"
    assert rows["sec.items"]["default"] == "[x, 1, null]"
    assert rows["sec.flag"]["default"] == "true" and rows["sec.flag"]["description"] == ""
    assert rows["sec.inner.depth"]["description"] == "how deep it goes"
    text = gen.render(mod)
    sec_table = text.split("## sec\n", 1)[1].split("### sec.inner", 1)[0]
    assert "| `sec.after` | int | `7` | declared after the nested section |" in sec_table  # in its own section
    assert "| `sec.name` | str or null | `null` | a name \\| or none |" in sec_table  # pipes escaped
    assert "| `sec.inner.depth` | int | `3` | how deep it goes |" in text.split("### sec.inner", 1)[1]


def test_notes_only_describe_keys_that_exist():
    keys = _schema_keys()
    assert not set(gen.NOTES) - keys, f"NOTES for keys the schema no longer has: {sorted(set(gen.NOTES) - keys)}"
    sections = {r["key"] for r in gen.schema_rows() if r["kind"] == "section"}
    assert not set(gen.SECTIONS) - sections


# ================================================================================ keys, flags, paths, links

SECTION_NAMES = ("model", "data", "optim", "train", "meta", "checkpoint", "logging", "eval")
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "txt", "tar", "sh", "sbatch", "safetensors", "log",
                 "parquet", "iob2", "pt"}
KEY_RE = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTION_NAMES)})(?:\.[a-z_][a-z0-9_]*)+)\b")


def _config_key_mentions(text: str) -> set[str]:
    found = set()
    for m in KEY_RE.finditer(text):
        key = m.group(1)
        if key.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue
        found.add(key)
    return found


def test_key_mention_scanner():
    text = "set `train.seq_len=512`, see eval.jsonl, `metalm.data.prepare`, meta.head.dropout and `logging.nope`"
    assert _config_key_mentions(text) == {"train.seq_len", "meta.head.dropout", "logging.nope"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_mention_only_config_keys_that_exist(doc):
    unknown = sorted(_config_key_mentions(doc.read_text()) - _schema_keys())
    assert not unknown, f"{doc.name} mentions config keys the schema does not have: {unknown}"


def _flags_in_source(path: Path) -> set[str]:
    return set(re.findall(r"""["'](--[A-Za-z][\w-]*)["']""", path.read_text()))


def _package_file(package: str, rel: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / rel


# program as written in a command line -> the source file whose argparse defines its flags;
# "launcher" programs take their own flags only up to the script they start.
PROGRAMS = {
    "launchers/pretrain.py": (REPO / "metalm" / "cli" / "train.py", False),  # a thin wrapper around it
    "metalm-train": (REPO / "metalm" / "cli" / "train.py", False),
    "launchers/evaluate.py": (REPO / "metalm" / "eval" / "watcher.py", False),
    "metalm-evaluate": (REPO / "metalm" / "eval" / "watcher.py", False),
    "launchers/dist_env.py": (REPO / "metalm" / "dist_env.py", False),  # a thin wrapper around it
    "scripts/gen_config_docs.py": (REPO / "scripts" / "gen_config_docs.py", False),
    "metalm-prepare": (REPO / "metalm" / "data" / "prepare.py", False),
    "metalm-export": (REPO / "metalm" / "export" / "hf.py", False),
    "torchrun": (_package_file("torch", "distributed/run.py"), True),
    "deepspeed": (_package_file("deepspeed", "launcher/runner.py"), True),
}
HELP = {"--help"}


def _code_lines(text: str) -> list[str]:
    """Logical lines of fenced code blocks (backslash continuations joined)."""
    lines: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        buf = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
            else:
                lines.append(buf + line)
                buf = ""
        if buf:
            lines.append(buf)
    return lines


def _flag_uses(line: str) -> list[tuple[str, str]]:
    """(program, --flag) for every flag given to one of PROGRAMS on a command line."""
    uses = []
    for prog, (_, is_launcher) in PROGRAMS.items():
        for m in re.finditer(rf"(?<![\w/.-]){re.escape(prog)}(?![\w/.-])", line):
            rest = line[m.end():]
            rest = re.split(r"\||;|&&|\)|(?<!\d)>", rest, maxsplit=1)[0]
            if is_launcher:
                rest = re.split(r"\S+\.py\b", rest, maxsplit=1)[0]
            uses += [(prog, f) for f in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", rest)]
    return uses


def test_flag_scanner():
    line = ('srun torchrun --nnodes=2 --rdzv_endpoint="$(python launchers/dist_env.py --rdzv-endpoint)" '
            "launchers/pretrain.py --config x.yaml | tee log")
    assert sorted(_flag_uses(line)) == [("launchers/dist_env.py", "--rdzv-endpoint"),
                                        ("launchers/pretrain.py", "--config"),
                                        ("torchrun", "--nnodes"), ("torchrun", "--rdzv_endpoint")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_use_only_flags_that_exist(doc):
    bad = []
    for line in _code_lines(doc.read_text()):
        for prog, flag in _flag_uses(line):
            source = PROGRAMS[prog][0]
            if source is None or not source.is_file():
                continue  # torch/deepspeed not installed: nothing to check against
            if flag not in _flags_in_source(source) | HELP:
                bad.append(f"{prog} {flag}")
    assert not bad, f"{doc.name} uses flags that do not exist: {bad}"


def test_evaluation_guide_lists_exactly_the_evaluator_options():
    text = (REPO / "docs" / "evaluation.md").read_text()
    table = text.split("| option | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `(--[\w-]+)", table, re.M))
    real = _flags_in_source(PROGRAMS["launchers/evaluate.py"][0]) - {"--log-level"}
    assert documented == real, f"missing: {sorted(real - documented)}, not real: {sorted(documented - real)}"


PATH_RE = re.compile(r"(?<![\w./-])((?:launchers|configs|metalm|scripts|docs|kernels|tests|benchmarks)/"
                     r"[A-Za-z0-9_./-]*[A-Za-z0-9_])")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_repository_paths_that_exist(doc):
    missing = sorted({p for p in PATH_RE.findall(doc.read_text()) if not (REPO / p).exists()})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def _anchors(md: Path) -> set[str]:
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", md.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{doc.name} has broken links: {broken}"


# ================================================================================ troubleshooting


def _code_text() -> str:
    files = [*REPO.glob("metalm/**/*.py"), *REPO.glob("launchers/**/*.py"), *REPO.glob("kernels/**/*.py")]
    return "\n".join(p.read_text() for p in files)


def test_troubleshooting_quotes_messages_the_code_raises():
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    fragments = re.findall(r"^####\s+`([^`]+)`\s*$", text, re.M)
    assert len(fragments) >= 20
    code = _code_text()
    absent = [f for f in fragments if f not in code]
    assert not absent, f"troubleshooting.md quotes messages no code writes: {absent}"


def test_troubleshooting_covers_every_error_type_raised():
    """Each of the project's own exception types has at least one of its messages explained."""
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    fragments = re.findall(r"^####\s+`([^`]+)`\s*$", text, re.M)
    code = _code_text()
    for exc in ("ConfigError", "DataError", "CheckpointError", "EpisodeError", "DistEnvError"):
        raises = re.findall(rf"raise (?:\w+\.)?{exc}\((.*?)\)(?: from None)?\n", code, re.S)
        assert raises, exc
        assert any(f in r for r in raises for f in fragments), f"no troubleshooting entry for a {exc}"
