"""Test environment: CPU-only, offline, Triton kernels through the interpreter.

These variables must be set before Triton modules or DeepSpeed are imported, hence at conftest import.
"""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# console scripts of the interpreter's environment (deepspeed, hadolint, shellcheck) even when it is not activated
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def console(capsys):
    """capsys, with the `metalm` loggers shown on stderr in the console format as an entry point shows them (the
    handler is removed afterwards)."""
    import logging

    from metalm.console import LOGGER, console_handler

    logger = logging.getLogger(LOGGER)
    handler, level = console_handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield capsys
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A toy tokenizer and probe text for the evaluator tests' tiny checkpoints (eval_cases.make_ckpt)."""
    from eval_cases import write_assets

    return write_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def corpus(shared_data) -> Path:
    """The shared jsonl corpus (wiki extracts in en, fr, es)."""
    return shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl"


@pytest.fixture(scope="session")
def tok_path(shared_data) -> str:
    """The OLMo tokenizer's JSON."""
    return str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json")


@pytest.fixture(scope="session")
def shards(corpus, tok_path, tmp_path_factory) -> Path:
    """Small real shards (seq_len 64) from the first 400 documents of the shared corpus, built once per session
    (about a second) and shared by every end-to-end training test."""
    from metalm.data.prepare import prepare

    root = tmp_path_factory.mktemp("train-shards")
    src = root / "slice.jsonl"
    with open(corpus) as f, open(src, "w") as out:
        for i, line in enumerate(f):
            if i >= 400:
                break
            out.write(line)
    prepare(str(src), tok_path, str(root / "shards"),
            64, val_fraction=0.05, samples_per_shard=256, num_proc=1, text_field="text", seed=0)
    return root / "shards"
