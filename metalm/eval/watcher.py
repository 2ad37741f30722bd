"""Asynchronous checkpoint evaluator: poll a checkpoint root, evaluate every complete checkpoint exactly once.

    python launchers/evaluate.py --watch runs/tiny              # RUN or RUN/checkpoints; results in RUN/eval/
    python launchers/evaluate.py --watch s3://bucket/run/checkpoints --results evals/run --every 10m
    python launchers/evaluate.py --checkpoint runs/tiny/checkpoints/step_00000100 --no-wandb

State, all in the results directory (default RUN/eval/):
    step_XXXXXXXX.json        the result; written atomically (tmp + rename). Its existence means "done":
                              a checkpoint with a result file is never evaluated again.
    step_XXXXXXXX.inprogress  written before an evaluation starts, removed after the result is written; found
                              on start-up without a result, it means the last run died mid-evaluation (that
                              checkpoint is evaluated again, once).
    step_XXXXXXXX.error.json  the evaluation raised, or the checkpoint is broken (a file that differs from its
                              COMPLETE marker, or is missing while the marker is there), or a metric raised
                              (the metrics computed are kept in it); not retried by --watch: every pass lists
                              the checkpoints held back so (delete the file to retry); --checkpoint retries it.
    eval.jsonl                one line per result (step, tokens, flat metrics), appended after the result file;
                              rebuilt from the result files on start-up if a crash left it short or torn.
    .lock                     held while a watcher runs (metalm.locks: names its host, pid and start time), so
                              two watchers never share a results dir.
    .snapshots/               per-evaluation snapshot of the files evaluation reads (hard links for local
                              checkpoints, downloaded copies for fsspec URLs), removed afterwards.

A checkpoint is read only once its COMPLETE marker exists (the trainer writes it last and renames the directory
into place), and only through its snapshot, which includes the marker: every file evaluated is verified against
the sizes and sha256s recorded at save time, and messages name the checkpoint, never its snapshot. A checkpoint
pruned by keep_last_k while being snapshotted is reported and skipped; one pruned after the snapshot is
evaluated from the snapshot. SIGTERM/SIGINT stop the watcher cleanly (an evaluation in progress is abandoned and
redone on the next start; exit status 0).

What cannot work at all is refused before any checkpoint is touched, in one line on stderr with exit status 2:
a device that is not there (--device cuda without a visible GPU), a --config override that does not parse or
validate, --shards without a manifest.json, a --watch directory that does not exist (unless --wait-for-dir,
for a watcher started before the trainer). --once exits with status 1 when an evaluation of its pass failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from metalm.checkpoint import MARKER, STEP_RE, CheckpointError, locate
from metalm.config import ConfigError, load_config
from metalm.console import console_handler
from metalm.device import DeviceError
from metalm.eval.checkpoint_eval import OverrideError, evaluate_checkpoint, input_problems, pick_device
from metalm.eval.sources import Ref, Source, Vanished
from metalm.fsutil import write_atomic, write_json_atomic
from metalm.locks import HeldLock
from metalm.storage import is_url
from metalm.wandb_run import WandbRun, wandb_mode

log = logging.getLogger("metalm.eval.watcher")


class Stop(BaseException):
    """SIGTERM/SIGINT during an evaluation (BaseException so that `except Exception` blocks let it through)."""


class UsageError(ValueError):
    """An option that cannot work (a missing directory, shards without a manifest): refused before any
    checkpoint is touched (exit status 2)."""


# ----------------------------------------------------------------------------------------------- watcher


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_shards(shards: str | None) -> str | None:
    """--shards: a URL as given, a local directory (made absolute) only if it holds a manifest.json."""
    if shards is None or is_url(shards):
        return shards
    if not (Path(shards) / "manifest.json").is_file():
        raise UsageError(f"--shards {shards}: no manifest.json there (expected a shards directory made by "
                         f"metalm-prepare, e.g. the run's data.shards)")
    return str(Path(shards).resolve())


class Watcher:
    """Evaluates the checkpoints under `source` once each. The constructor checks what does not depend on a
    checkpoint (overrides, device, shards) and raises before anything is created; `run` checks the source."""

    def __init__(self, source: str, results: str | None = None, overrides: list[str] | None = None,
                 every: float = 300.0, device: str = "auto", wandb: bool = True, shards: str | None = None,
                 wait_for_dir: bool = False):
        self.given = source
        self.source = Source(source)
        if results is None:
            if not self.source.local:
                raise ValueError(f"--results is required for a remote checkpoint location ({source})")
            results = str(self.source.run_dir / "eval")
        self.results = Path(results)
        self.overrides = list(overrides or [])
        problems = input_problems(load_config(None, self.overrides))  # ConfigError now, not per checkpoint later
        if problems:
            raise UsageError(f"--config {'; '.join(problems)}")
        self.every = every
        self.device = pick_device(device)
        self.shards = check_shards(shards)
        self.wait_for_dir = wait_for_dir
        self.wandb_enabled = wandb
        self._wandb = WandbRun(f"results go on being written to {self.results}")
        self._lock = HeldLock(self.results / ".lock", lambda holder: (
            f"another evaluator holds {self.results / '.lock'} ({holder}); stop it, or give this one another "
            f"--results directory"))
        self._evaluating = False
        self.stop_requested = False
        self._announced: set[str] = set()
        self._override_failed: set[str] = set()  # the overrides do not apply to these: not retried by this process
        self.evaluated: list[str] = []
        self.failed: list[str] = []  # of the current (last) pass
        self.held_back: list[tuple[str, Path]] = []  # (name, error file) found by the last scan

    # -- state files
    def result_path(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def error_path(self, name: str) -> Path:
        return self.results / f"{name}.error.json"

    def acquire(self) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        shutil.rmtree(self.results / ".snapshots", ignore_errors=True)
        for p in self.results.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)  # torn atomic writes of a killed run
        self.reconcile_jsonl()

    def release(self) -> None:
        self._lock.release()
        self._wandb.finish()

    def _results(self) -> list[dict]:
        out = []
        for p in sorted(self.results.glob("step_*.json")):
            if p.name.endswith(".error.json"):
                continue
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                log.warning("unreadable result %s (%s)", p, e)
        return out

    @staticmethod
    def _line(rec: dict) -> dict:
        return {"checkpoint": rec["checkpoint"], "step": rec["step"], "tokens": rec["tokens"],
                "evaluated_at": rec.get("evaluated_at"), "seconds": rec.get("seconds"), **rec["metrics"]}

    def reconcile_jsonl(self) -> None:
        """Make eval.jsonl hold exactly one line per result file, in step order (after a crash)."""
        path = self.results / "eval.jsonl"
        have: dict[str, dict] = {}
        lines_ok = True
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    if rec["checkpoint"] in have:
                        lines_ok = False
                    have[rec["checkpoint"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    lines_ok = False
        results = {r["checkpoint"]: r for r in self._results()}
        if lines_ok and set(have) == set(results):
            return
        rows = sorted((self._line(r) for r in results.values()), key=lambda r: r["step"])
        write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        log.info("rebuilt %s from %d result files", path, len(rows))

    def _append_jsonl(self, rec: dict) -> None:
        with open(self.results / "eval.jsonl", "a") as f:
            f.write(json.dumps(self._line(rec), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- scanning
    def pending(self) -> list[Ref]:
        """The complete checkpoints without a result, oldest first; those an error file holds back are in
        `held_back`."""
        refs, held = [], []
        for name, loc in self.source.list():
            if self.result_path(name).is_file():
                continue
            if self.error_path(name).is_file():
                held.append((name, self.error_path(name)))
                continue
            if name in self._override_failed:
                continue
            if not self.source.complete(loc):
                if name not in self._announced:
                    log.info("waiting for %s to complete (no %s marker yet)", name, MARKER)
                    self._announced.add(name)
                continue
            refs.append(Ref(name, int(STEP_RE.match(name).group(1)), loc))
        self.held_back = held
        return sorted(refs, key=lambda r: r.step)

    # -- one checkpoint
    def process(self, ref: Ref) -> dict | None:
        """Evaluate `ref` and record it. Returns the record, or None if it vanished or failed."""
        inprog = self.results / f"{ref.name}.inprogress"
        if inprog.is_file():
            log.warning("%s: a previous evaluation was interrupted; evaluating it again", ref.name)
        write_json_atomic(inprog, {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}, sort_keys=True)
        snap = self.results / ".snapshots" / f"{ref.name}-{os.getpid()}"
        try:
            try:
                self.source.snapshot(ref, snap)
            except Vanished as e:
                log.warning("%s: skipped: %s", ref.name, e)
                inprog.unlink(missing_ok=True)
                return None
            except CheckpointError as e:  # there, but a file is missing: it stays broken, record it once
                self._record_error(ref, e, snap)
                inprog.unlink(missing_ok=True)
                return None
            log.info("evaluating %s on %s", ref.name, self.device)
            self._evaluating = True
            if self.stop_requested:
                raise Stop()
            try:
                rec = evaluate_checkpoint(snap, self.overrides, self.device,
                                          progress=lambda s: log.info("%s: %s", ref.name, s), name=ref.name,
                                          origin=ref.location, shards=self.shards, results=self.results)
            except OverrideError as e:  # the overrides' fault: no error file, so a corrected restart evaluates it
                self._evaluating = False
                self._override_failed.add(ref.name)
                self.failed.append(ref.name)
                log.error("%s: not evaluated: %s; no error file is written: correct --config and restart",
                          ref.name, self._unsnap(str(e), snap, ref))
                inprog.unlink(missing_ok=True)
                return None
            except Exception as e:  # noqa: BLE001 - one broken checkpoint must not stop the watcher
                self._evaluating = False
                self._record_error(ref, e, snap)
                inprog.unlink(missing_ok=True)
                return None
            self._evaluating = False
            if rec["failed"]:  # some metrics were computed: keep them in the error file
                self._record_partial(ref, rec, snap)
                inprog.unlink(missing_ok=True)
                return None
            rec["checkpoint"] = ref.name  # not the snapshot directory's name
            rec["source"] = ref.location
            rec["evaluated_at"] = _now()
            write_json_atomic(self.result_path(ref.name), rec, sort_keys=True)  # the commit point
            self._append_jsonl(rec)
            inprog.unlink(missing_ok=True)
        finally:
            self._evaluating = False
            shutil.rmtree(snap, ignore_errors=True)
        self.evaluated.append(ref.name)
        log.info("%s done in %.1fs -> %s", ref.name, rec["seconds"], self.result_path(ref.name))
        self._log_wandb(rec)
        return rec

    @staticmethod
    def _unsnap(text: str, snap: Path, ref: Ref) -> str:
        """`text` naming the checkpoint where it names its snapshot (which is gone by the time anyone reads it)."""
        for form in dict.fromkeys((str(snap.resolve()), str(snap.absolute()), str(snap))):
            text = text.replace(form, ref.location)
        return text

    def _record_error(self, ref: Ref, e: BaseException, snap: Path) -> None:
        """Write RESULTS/step_X.error.json (the checkpoint is held back until it is deleted) and log one line;
        an unexpected exception (not a broken checkpoint or config) gets its traceback too."""
        message = self._unsnap(f"{type(e).__name__}: {e}", snap, ref)
        expected = isinstance(e, (CheckpointError, ConfigError))
        record = {"checkpoint": ref.name, "source": ref.location, "error": message, "at": _now()}
        if not expected:
            record["traceback"] = self._unsnap(traceback.format_exc(), snap, ref)
        err = self.error_path(ref.name)
        write_json_atomic(err, record, sort_keys=True)
        self.failed.append(ref.name)
        log.error("%s: evaluation failed; recorded in %s (delete it to retry): %s%s", ref.name, err, message,
                  "" if expected else "\n" + record["traceback"].rstrip())

    def _record_partial(self, ref: Ref, rec: dict, snap: Path) -> None:
        """Write RESULTS/step_X.error.json for an evaluation where some metrics raised, with the metrics that were
        computed, and log one line."""
        failed = {m: self._unsnap(msg, snap, ref) for m, msg in rec["failed"].items()}
        record = {"checkpoint": ref.name, "source": ref.location, "at": _now(),
                  "error": "; ".join(f"{m}: {msg}" for m, msg in failed.items()),
                  "failed": failed, "metrics": rec["metrics"], "skipped": rec["skipped"], "step": rec["step"]}
        err = self.error_path(ref.name)
        write_json_atomic(err, record, sort_keys=True)
        self.failed.append(ref.name)
        kept = ", ".join(sorted({k.split("/", 1)[0] for k in rec["metrics"]})) or "none"
        log.error("%s: evaluation failed (%s); the metrics computed (%s) are kept in %s (delete it to retry)",
                  ref.name, record["error"], kept, err)

    def _log_wandb(self, rec: dict) -> None:
        run = rec.get("run", {})
        if not self.wandb_enabled or not run.get("wandb", True):
            return
        run_id = "eval-" + hashlib.sha1(str(self.results.resolve()).encode()).hexdigest()[:12]
        name = run.get("name") or self.results.parent.name
        if not self._wandb.start({"eval/step": None, "eval/*": "eval/step"}, project=run.get("project") or "metalm",
                                 entity=run.get("entity"), id=run_id, resume="allow",
                                 mode=wandb_mode(run.get("mode", "auto")), job_type="eval", name=f"{name}-eval",
                                 dir=str(self.results)):
            return
        payload = {f"eval/{k}": v for k, v in rec["metrics"].items()}
        payload["eval/step"] = rec["step"]
        payload["eval/tokens"] = rec["tokens"]
        self._wandb.log(payload)

    # -- loops
    def poll(self) -> int:
        """One pass: evaluate what is pending. Returns how many were evaluated; `failed` lists the failures."""
        n = 0
        self.failed = []
        refs = self.pending()
        if self.held_back:
            log.warning("held back by earlier errors: %s; delete the error file to retry",
                        ", ".join(f"{name} ({err})" for name, err in self.held_back))
        if refs:
            log.info("%d checkpoint(s) to evaluate: %s", len(refs), ", ".join(r.name for r in refs))
        for ref in refs:
            if self.stop_requested:
                break
            if self.process(ref) is not None:
                n += 1
        return n

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True
        log.info("received %s; stopping", signal.Signals(signum).name)
        if self._evaluating:
            self._evaluating = False
            raise Stop()

    def _sleep(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while not self.stop_requested and time.time() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.time())))

    def wait_for_source(self) -> bool:
        """True once the watched directory exists; UsageError when it does not and wait_for_dir is off; False
        when stopped while waiting for it."""
        if self.source.exists():
            return True
        if self.source.not_a_directory():
            raise UsageError(f"--watch {self.given}: not a directory")
        if not self.wait_for_dir:
            raise UsageError(f"--watch {self.given}: no such directory; check the path, or pass --wait-for-dir "
                             f"to wait for it to appear (a watcher started before the trainer)")
        log.info("waiting for %s to appear", self.given)
        while not self.stop_requested:
            self._sleep(min(max(self.every, 0.05), 2.0))
            if self.source.exists():
                log.info("%s appeared", self.given)
                return True
        return False

    def run(self, once: bool = False) -> int:
        """Poll until stopped (or one pass with `once`). 0, or 1 when `once` and an evaluation failed."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not self.wait_for_source():
                return 0
            self.acquire()
            log.info("watching %s every %.0fs; results in %s", self.source, self.every, self.results)
            while not self.stop_requested:
                self.poll()
                if once:
                    break
                self._sleep(self.every)
        except Stop:
            log.info("stopped during an evaluation; it will be redone on the next start")
        finally:
            self.release()
            for s, h in old.items():
                signal.signal(s, h)
        return 1 if once and self.failed else 0


def evaluate_one(path: str, results: str | None, overrides: list[str], device: str, wandb: bool,
                 force: bool = False, shards: str | None = None) -> int:
    """--checkpoint PATH: evaluate a single checkpoint, recorded in the same results layout. PATH is a checkpoint
    directory, or a run directory, its checkpoints/ directory or its `latest` pointer (the newest complete
    checkpoint there; `metalm.checkpoint.locate`)."""
    try:
        store, name = locate(path)
    except CheckpointError as e:
        raise UsageError(f"--checkpoint {e}") from None
    if store.where(name) != path.rstrip("/"):
        log.info("--checkpoint %s: evaluating %s, the newest complete checkpoint there", path, store.where(name))
    w = Watcher(store.url, results, overrides, 0, device, wandb, shards=shards)
    if name not in dict(w.source.list()):
        raise UsageError(f"--checkpoint {path}: no such directory")
    if force:
        w.result_path(name).unlink(missing_ok=True)
        (w.results / f"{name}.error.json").unlink(missing_ok=True)
    old = {s: signal.signal(s, w._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        w.acquire()
        if w.result_path(name).is_file():
            log.info("%s already evaluated: %s (use --force to redo)", name, w.result_path(name))
            return 0
        if w.error_path(name).is_file():  # asked for by name: try again rather than report the failure as done
            log.warning("%s: the last evaluation failed (%s); evaluating it again", name, w.error_path(name))
            w.error_path(name).unlink()
        loc = dict(w.source.list()).get(name)
        if loc is None or not w.source.complete(loc):
            log.error("%s is not a complete checkpoint (no %s marker)", path, MARKER)
            return 1
        rec = w.process(Ref(name, int(STEP_RE.match(name).group(1)), loc))
        return 0 if rec is not None else 1
    except Stop:
        return 0
    finally:
        w.release()
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------- CLI


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a duration such as 30s, 5m, 1h")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="metalm asynchronous checkpoint evaluator",
                                epilog="Metrics come from the checkpoint's eval.* config (eval.metrics: val_loss, "
                                       "rank, entropy, ner); change them with --config key=value ...")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--watch", metavar="DIR_OR_URL", help="run dir, its checkpoints/ dir, or an fsspec URL")
    what.add_argument("--checkpoint", metavar="PATH", help="evaluate this one checkpoint and exit")
    p.add_argument("--every", type=parse_duration, default=300.0, help="poll interval (default 5m)")
    p.add_argument("--once", action="store_true",
                   help="evaluate what is pending, then exit (status 1 when an evaluation failed)")
    p.add_argument("--wait-for-dir", action="store_true",
                   help="with --watch: wait for the directory to appear (a watcher started before the trainer) "
                        "instead of refusing a directory that does not exist")
    p.add_argument("--results", help="results dir (default RUN/eval; required for URLs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides applied to each checkpoint's config, e.g. eval.metrics=[rank,entropy]")
    p.add_argument("--shards", metavar="PATH",
                   help="validation shards (a directory with manifest.json, or a URL) instead of the checkpoint's "
                        "data.shards")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--force", action="store_true", help="with --checkpoint: evaluate again even if done")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def configure_logging(level: str) -> None:
    """metalm's own messages at `level` on stderr; other libraries' (boto, s3fs, urllib3, ...) at WARNING and
    above only; W&B's console lines (banner, run summary) off unless the user set WANDB_SILENT."""
    logging.basicConfig(level=logging.WARNING, handlers=[console_handler("metalm-evaluate", timestamps=True)])
    logging.getLogger("metalm").setLevel(level.upper())
    os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: list[str] | None = None) -> int:
    """The CLI. Exit status 0: done (or stopped by a signal); 1: an evaluation of a --once pass (or the
    --checkpoint) failed, or the source cannot be read; 2: refused up front (bad option, override, device or
    directory), with nothing touched."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level)
    try:
        load_config(None, args.config)  # fail fast on a bad override, before any checkpoint is looked at
        if args.checkpoint:
            if args.wait_for_dir:
                raise UsageError("--wait-for-dir goes with --watch, not --checkpoint")
            return evaluate_one(args.checkpoint, args.results, args.config, args.device, not args.no_wandb,
                                args.force, args.shards)
        w = Watcher(args.watch, args.results, args.config, args.every, args.device, not args.no_wandb,
                    shards=args.shards, wait_for_dir=args.wait_for_dir)
        return w.run(once=args.once)
    except ConfigError as e:
        print(f"metalm-evaluate: configuration error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (UsageError, DeviceError) as e:
        print(f"metalm-evaluate: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, ImportError, OSError) as e:  # ImportError: e.g. s3:// without s3fs
        print(f"metalm-evaluate: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
