"""The user's documentation stays true to the code.

- docs/configuration.md is exactly what scripts/gen_config_docs.py generates from metalm/config.py;
- every config key, command-line flag, repository path and relative link in the docs exists;
- every error message quoted in docs/troubleshooting.md is one the code can raise;
- every shell command in README.md and docs/*.md runs in a test here, or its block says why not.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from procs import cpu_run_env, free_port
from s3server import s3_server  # noqa: F401 - the fixture

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


# ================================================================================ every command runs, or says why not
#
# Every fenced block of README.md and docs/*.md has a language. Each command of a shell block (bash, sh, shell,
# console) either runs in one of the tests below, as written, with small overrides appended (fewer steps, a
# smaller model, the session's shards; see `_as_run`), or the block is preceded by a marker saying why not, or
# naming the test file that runs it (a file that reads that doc):
#
#     <!-- not run by tests: GPU -->
#     <!-- run by tests/test_hf_export.py -->
#
# RUN lists the commands the tests run, as the docs write them (continuations joined, comments dropped). A new
# command in a doc fails test_every_documented_command_runs_or_says_why_not until a test runs it or it is marked;
# a changed command fails it too (the test runs the doc's text, so a command that no longer works fails there).

RUN_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARKER_RE = re.compile(r"<!--\s*(?:not run by tests:\s*(?P<reason>.*?)|run by (?P<runner>\S+))\s*-->\s*\Z", re.S)
FENCE_RE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)

# the quick start's run and everything the docs do with it (test_quick_start_run_evaluate_report_export)
QUICKSTART = ("DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank launchers/pretrain.py "
              "--config configs/cpu-tiny.yaml")
EVAL_CHECKPOINT = ("python launchers/evaluate.py --checkpoint runs/cpu-tiny/checkpoints/step_00000300 --no-wandb "
                   "--config eval.ner.train=ner/ja_hironsan-train.iob2 eval.ner.test=ner/ja_hironsan-test.iob2 "
                   "eval.ner.word_sep=")
EVAL_WATCH = "python launchers/evaluate.py --watch runs/cpu-tiny"
EVAL_ONCE = "metalm-evaluate --watch runs/cpu-tiny --once"
VANILLA = ("python launchers/pretrain.py --config configs/cpu-tiny.yaml meta.enabled=false "
           "train.run_dir=runs/cpu-tiny-vanilla")
REPORT = "metalm-report runs/cpu-tiny-vanilla runs/cpu-tiny --out report/"
EXPORT = "metalm-export runs/cpu-tiny/checkpoints/step_00000300 --out exported/"
EXPORT_NAMED = "metalm-export runs/cpu-tiny/checkpoints/step_00000300 --out exported/cpu-tiny"
# previews and data preparation (test_previews_and_prepare)
DRY_RUN = "python launchers/pretrain.py --config configs/570m.yaml --dry-run --world-size 8"
PRINT_CONFIG_TRAIN = "metalm-train --config configs/570m.yaml --print-config --world-size 8"
DRY_RUN_TRAIN = "metalm-train --config configs/570m.yaml --dry-run --world-size 8"
PREPARE_GLOB = "metalm-prepare --source 'my_corpus/*.jsonl' --seq-len 2048 --out data/mine/shards"
PREPARE_CORPUS = ("metalm-prepare --source 'corpus/*.jsonl' --tokenizer builtin:olmo --seq-len 2048 "
                  "--out data/my-corpus-2048/shards")
PREPARE_CONFIG = "metalm-prepare --config configs/570m.yaml"
MY_CORPUS = ("python launchers/pretrain.py --config configs/cpu-tiny.yaml data.source='corpus/*.jsonl' "
             "data.shards=data/my-corpus-128/shards train.run_dir=runs/my-corpus")
# docs/buckets.md's walk-through (test_bucket_walk_through), against tests/s3server.py's server
BUCKET_UPLOAD = ("python -c \"import fsspec; fs = fsspec.filesystem('s3'); fs.mkdir('my-bucket'); "
                 "fs.put_file('../shared/data/corpus/wiki-vital-en-fr-es.jsonl', 'my-bucket/corpus/wiki.jsonl')\"")
BUCKET_PREPARE = ("metalm-prepare --source 's3://my-bucket/corpus/*.jsonl' --tokenizer builtin:olmo --seq-len 128 "
                  "--out s3://my-bucket/shards/wiki-128 --no-progress")
BUCKET_TRAIN = ("DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_local_rank launchers/pretrain.py --config "
                "configs/cpu-tiny.yaml data.shards=s3://my-bucket/shards/wiki-128 data.prepare_if_missing=false "
                "train.run_dir=s3://my-bucket/runs/bucket-demo train.max_steps=20 checkpoint.every=10 "
                "logging.wandb=false")
BUCKET_EVAL = ("python launchers/evaluate.py --watch s3://my-bucket/runs/bucket-demo --once --results "
               "evals/bucket-demo --no-wandb")
BUCKET_LIST = "python -c \"import fsspec; print('\\n'.join(sorted(fsspec.filesystem('s3').find('my-bucket/runs'))))\""

RUN = {QUICKSTART, EVAL_CHECKPOINT, EVAL_WATCH, EVAL_ONCE, VANILLA, REPORT, EXPORT, EXPORT_NAMED,
       DRY_RUN, PRINT_CONFIG_TRAIN, DRY_RUN_TRAIN, PREPARE_GLOB, PREPARE_CORPUS, PREPARE_CONFIG, MY_CORPUS,
       BUCKET_UPLOAD, BUCKET_PREPARE, BUCKET_TRAIN, BUCKET_EVAL, BUCKET_LIST}


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a # after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _block_commands(body: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments dropped, whitespace collapsed."""
    out, buf = [], ""
    for raw in body.splitlines():
        line = _strip_comment(raw).rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        cmd = " ".join((buf + line).split())
        buf = ""
        if cmd:
            out.append(cmd)
    if buf.strip():
        out.append(" ".join(buf.split()))
    return out


def _doc_blocks(text: str) -> list[dict]:
    """Every fenced block: its language, first line number, commands (shell blocks), and from a marker right before
    it the reason it is not run or the test file that runs it (None without one)."""
    blocks = []
    for m in FENCE_RE.finditer(text):
        before = text[:m.start()].rstrip()
        marker = MARKER_RE.search(before[before.rfind("<!--"):]) if before.endswith("-->") else None
        lang = m.group(1).strip().lower()
        blocks.append({"lang": lang, "line": text.count("\n", 0, m.start()) + 1,
                       "commands": _block_commands(m.group(2)) if lang in SHELL_LANGS else [],
                       "reason": " ".join(marker["reason"].split()) if marker and marker["reason"] is not None
                       else None, "runner": marker["runner"] if marker else None})
    return blocks


def _unaccounted(text: str, run: set[str], name: str = "doc.md") -> list[str]:
    """What breaks the rule in document `name`: blocks without a language, empty markers, a "run by" test file
    that does not exist or never names the document, and commands of unmarked shell blocks that no test runs."""
    bad = []
    for b in _doc_blocks(text):
        runner = REPO / b["runner"] if b["runner"] else None
        if not b["lang"]:
            bad.append(f"line {b['line']}: a block without a language (```bash for commands, ```text for output)")
        elif b["reason"] == "":
            bad.append(f"line {b['line']}: 'not run by tests:' without a reason")
        elif runner is not None:
            if not (runner.is_file() and name in runner.read_text()):
                bad.append(f"line {b['line']}: {b['runner']} does not exist or does not read {name}")
        elif b["reason"] is None:
            bad += [f"line {b['line']}: {c}" for c in b["commands"] if c not in run]
    return bad


def test_the_command_checker_finds_what_breaks_the_rule():
    doc = textwrap.dedent("""\
        Intro.

        ```bash
        metalm-train --config a.yaml \\
            train.max_steps=3   # a comment
        metalm-new --thing '#not a comment'
        ```

        <!-- not run by tests: GPU
        only -->
        ```bash
        deepspeed launchers/pretrain.py --config configs/570m.yaml
        ```

        <!-- not run by tests: -->
        ```sh
        echo hi
        ```

        ```
        output line
        ```

        ```text
        fine
        ```

        <!-- run by tests/test_hf_export.py -->
        ```bash
        python zero_to_fp32.py . fp32/
        ```

        <!-- run by tests/nope.py -->
        ```bash
        true
        ```
        """)
    blocks = _doc_blocks(doc)
    assert [b["lang"] for b in blocks] == ["bash", "bash", "sh", "", "text", "bash", "bash"]
    assert blocks[0]["commands"] == ["metalm-train --config a.yaml train.max_steps=3",
                                     "metalm-new --thing '#not a comment'"]
    assert blocks[0]["reason"] is None and blocks[1]["reason"] == "GPU only" and blocks[2]["reason"] == ""
    assert blocks[5]["runner"] == "tests/test_hf_export.py" and blocks[5]["reason"] is None
    assert _unaccounted(doc, {"metalm-train --config a.yaml train.max_steps=3"}, "exporting.md") == [
        "line 3: metalm-new --thing '#not a comment'",
        "line 16: 'not run by tests:' without a reason",
        "line 20: a block without a language (```bash for commands, ```text for output)",
        "line 34: tests/nope.py does not exist or does not read exporting.md",
    ]


@pytest.mark.parametrize("doc", RUN_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_runs_or_says_why_not(doc):
    bad = _unaccounted(doc.read_text(), RUN, doc.name)
    assert not bad, (f"{doc.relative_to(REPO)}: commands that no test runs; run them in tests/test_docs.py (RUN) or "
                     f"put <!-- not run by tests: WHY --> before their block:\n  " + "\n  ".join(bad))


def test_every_command_the_tests_run_is_in_the_docs():
    documented = {c for doc in RUN_DOCS for b in _doc_blocks(doc.read_text())
                  if b["reason"] is None and b["runner"] is None for c in b["commands"]}
    assert not RUN - documented, f"RUN lists commands no doc has (any more): {sorted(RUN - documented)}"


def test_the_readme_quickstart_command_is_what_make_runs():
    make = (REPO / "Makefile").read_text()
    recipe = make.split("\nquickstart:", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]
    nproc = re.search(r"^NPROC \?= (\d+)$", make, re.M).group(1)
    recipe = " ".join(recipe.replace("\\\n", " ").split())
    recipe = recipe.replace("$(PYTHON) -m deepspeed.launcher.runner", "deepspeed").replace("$(NPROC)", nproc)
    assert recipe == QUICKSTART
    readme = [c for b in _doc_blocks((REPO / "README.md").read_text()) for c in b["commands"]]
    assert QUICKSTART in readme


# -------------------------------------------------------------------------------- running them

TINY = ["train.micro_batch=4", "train.global_batch=16", "model.n_layers=2", "train.max_steps=2",
        "train.log_every=1", "train.val_every=2", "train.val_batches=2", "checkpoint.every=1", "optim.warmup_steps=1",
        "logging.wandb=false", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=2",
        "eval.batch_size=4", "eval.val_batches=2", "eval.seq_len=32"]
TINY_TRAIN = ["train.seq_len=64", "model.max_seq_len=64", "data.prepare_if_missing=false", *TINY]  # conftest's shards
LAST = "step_00000002"  # the tiny run's last checkpoint, in place of the documented run's step_00000300


def _sandbox(root: Path, shared_data: Path) -> Path:
    """A directory laid out like a checkout for the docs' relative paths, writing its own runs/, data/, ..."""
    root.mkdir()
    for name in ("launchers", "configs", "benchmarks", "scripts"):
        (root / name).symlink_to(REPO / name)
    (root / "ner").symlink_to(shared_data / "ner")
    (root.parent / "shared").symlink_to(shared_data.parent)  # ../shared/data, as beside this checkout
    return root


def _as_run(cmd: str, *extra: str) -> str:
    """The documented command as the tests run it: `extra` appended, the tiny run's last checkpoint for the
    documented one, and a free rendezvous port for deepspeed (other runs may share this machine)."""
    cmd = cmd.replace("step_00000300", LAST)
    cmd = re.sub(r"(?<![\w./-])deepspeed ", f"deepspeed --master_port {free_port()} ", cmd, count=1)
    return " ".join([cmd, *extra])


def _run(cmd: str, cwd: Path, *extra: str, timeout: int = 300, env: dict | None = None) -> str:
    env = dict(env or cpu_run_env())
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    line = _as_run(cmd, *extra)
    out = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"`{line}` exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_quick_start_run_evaluate_report_export(tmp_path, shards, shared_data):
    """One tiny run serves the README's quick start and what it does next: evaluate (one checkpoint with NER,
    then the watcher twice), the AR-only baseline, the report comparing the two, and the export."""
    box = _sandbox(tmp_path / "metalm", shared_data)
    data = [f"data.shards={shards}", *TINY_TRAIN]
    _run(QUICKSTART, box, *data)
    run = box / "runs" / "cpu-tiny"
    assert (run / "checkpoints" / LAST / "COMPLETE").is_file()
    _run(EVAL_CHECKPOINT, box, "eval.ner.max_sentences=40", "eval.ner.epochs=1")
    rec = json.loads((run / "eval" / f"{LAST}.json").read_text())
    assert {"val_loss", "ner/f1", "entropy/norm_mean"} <= set(rec["metrics"]), sorted(rec["metrics"])
    _run(EVAL_WATCH, box, "--once", "--no-wandb")  # the watcher polls until stopped: one pass here
    out = _run(EVAL_ONCE, box, "--no-wandb")
    assert "0 checkpoint(s) to evaluate" not in out and "evaluating" not in out  # the first pass did them all
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == ["step_00000001.json", f"{LAST}.json"]
    _run(VANILLA, box, *data)
    assert (box / "runs" / "cpu-tiny-vanilla" / "checkpoints" / LAST / "COMPLETE").is_file()
    _run(REPORT, box)
    md = (box / "report" / "report.md").read_text()
    assert "| cpu-tiny-vanilla |" in md and "| cpu-tiny |" in md and (box / "report" / "loss.png").is_file()
    for cmd, out_dir in ((EXPORT, box / "exported"), (EXPORT_NAMED, box / "exported" / "cpu-tiny")):
        _run(cmd, box)
        assert json.loads((out_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_previews_and_prepare(tmp_path, shared_data):
    """The previews, run exactly as documented, and the documented metalm-prepare commands on a few hundred
    documents of the real corpus (under the names the docs give their sources), and the quick start's training on
    such a corpus."""
    box = _sandbox(tmp_path / "metalm", shared_data)
    for cmd in (DRY_RUN, DRY_RUN_TRAIN):
        out = _run(cmd, box)
        assert "# model: 569.81M parameters" in out and "dry run: nothing trained" in out
    out = _run(PRINT_CONFIG_TRAIN, box)
    assert "# world: 8 processes" in out and "train_micro_batch_size_per_gpu" in out
    lines = (shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl").read_text().splitlines(True)[:600]
    for d in ("my_corpus", "corpus"):
        (box / d).mkdir()
        (box / d / "a.jsonl").write_text("".join(lines[:300]))
        (box / d / "b.jsonl").write_text("".join(lines[300:]))
    small = ("--max-docs", "600", "--num-proc", "1", "--no-progress")
    for cmd, out_dir in ((PREPARE_GLOB, "data/mine/shards"), (PREPARE_CORPUS, "data/my-corpus-2048/shards"),
                         (PREPARE_CONFIG, "data/wiki-vital-2048/shards")):
        _run(cmd, box, *small)
        man = json.loads((box / out_dir / "manifest.json").read_text())
        assert man["seq_len"] == 2048 and man["totals"]["docs"] == 600 and man["splits"]["train"]["samples"] > 0
    _run(MY_CORPUS, box, *TINY, "data.val_fraction=0.05")  # prepares data/my-corpus-128 (seq_len 128), then trains
    assert json.loads((box / "data" / "my-corpus-128" / "shards" / "manifest.json").read_text())["seq_len"] == 128
    assert (box / "runs" / "my-corpus" / "checkpoints" / LAST / "COMPLETE").is_file()


def test_bucket_walk_through(tmp_path, shared_data, s3_server):  # noqa: F811 - the fixture
    """docs/buckets.md's "Try it on one machine", against the suite's local S3 server (a tiny model, 2 steps)."""
    box = _sandbox(tmp_path / "metalm", shared_data)
    _run(BUCKET_UPLOAD, box)
    _run(BUCKET_PREPARE, box, "--max-docs", "400")
    _run(BUCKET_TRAIN, box, *TINY)
    _run(BUCKET_EVAL, box)
    assert sorted(p.name for p in (box / "evals" / "bucket-demo").glob("step_*.json")) == [
        "step_00000001.json", f"{LAST}.json"]
    listing = _run(BUCKET_LIST, box)
    assert f"my-bucket/runs/bucket-demo/checkpoints/{LAST}/COMPLETE" in listing
