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
    step_XXXXXXXX.error.json  the evaluation raised; not retried (delete the file to retry).
    eval.jsonl                one line per result (step, tokens, flat metrics), appended after the result file;
                              rebuilt from the result files on start-up if a crash left it short or torn.
    .lock                     flock held while a watcher runs, so two watchers never share a results dir.
    .snapshots/               per-evaluation snapshot of the files evaluation reads (hard links for local
                              checkpoints, downloaded copies for fsspec URLs), removed afterwards.

A checkpoint is read only once its COMPLETE marker exists (the trainer writes it last and renames the directory
into place), and only through its snapshot: a checkpoint pruned by keep_last_k while being snapshotted is
reported and skipped; one pruned after the snapshot is evaluated from the snapshot. SIGTERM/SIGINT stop the
watcher cleanly (an evaluation in progress is abandoned and redone on the next start; exit status 0).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
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
from pathlib import Path
from typing import Optional

from metalm.eval.checkpoint_eval import evaluate_checkpoint, pick_device
from metalm.eval.sources import LocalSource, Ref, Vanished, make_source
from metalm.fsutil import write_atomic, write_json_atomic
from metalm.checkpoint import MARKER, STEP_RE

log = logging.getLogger("metalm.eval.watcher")

class Stop(BaseException):
    """SIGTERM/SIGINT during an evaluation (BaseException so that `except Exception` blocks let it through)."""


# ----------------------------------------------------------------------------------------------- watcher


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Watcher:
    def __init__(self, source: str, results: Optional[str] = None, overrides: list[str] | None = None,
                 every: float = 300.0, device: str = "auto", wandb: bool = True):
        self.source = make_source(source)
        if results is None:
            if not isinstance(self.source, LocalSource):
                raise ValueError(f"--results is required for a remote checkpoint location ({source})")
            results = str(self.source.run_dir / "eval")
        self.results = Path(results)
        self.overrides = list(overrides or [])
        self.every = every
        self.device = pick_device(device)
        self.wandb_enabled = wandb
        self._wandb = None
        self._lock_fd: Optional[int] = None
        self._evaluating = False
        self.stop_requested = False
        self._announced: set[str] = set()
        self.evaluated: list[str] = []

    # -- state files
    def result_path(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.result_path(name).is_file() or (self.results / f"{name}.error.json").is_file()

    def acquire(self) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.results / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"another evaluator holds {self.results / '.lock'}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._lock_fd = fd
        shutil.rmtree(self.results / ".snapshots", ignore_errors=True)
        for p in self.results.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)  # torn atomic writes of a killed run
        self.reconcile_jsonl()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._wandb is not None:
            with contextlib.suppress(Exception):
                self._wandb.finish()
            self._wandb = None

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
        refs = []
        for name, loc in self.source.list():
            if self.done(name):
                continue
            if not self.source.complete(loc):
                if name not in self._announced:
                    log.info("waiting for %s to complete (no %s marker yet)", name, MARKER)
                    self._announced.add(name)
                continue
            refs.append(Ref(name, int(STEP_RE.match(name).group(1)), loc))
        return sorted(refs, key=lambda r: r.step)

    # -- one checkpoint
    def process(self, ref: Ref) -> Optional[dict]:
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
            log.info("evaluating %s on %s", ref.name, self.device)
            self._evaluating = True
            if self.stop_requested:
                raise Stop()
            try:
                rec = evaluate_checkpoint(snap, self.overrides, self.device,
                                          progress=lambda s: log.info("%s: %s", ref.name, s))
            except Exception as e:  # noqa: BLE001 - one broken checkpoint must not stop the watcher
                self._evaluating = False
                log.exception("%s: evaluation failed; recorded in %s.error.json (delete it to retry)", ref.name,
                              ref.name)
                write_json_atomic(self.results / f"{ref.name}.error.json",
                                  {"checkpoint": ref.name, "error": f"{type(e).__name__}: {e}", "at": _now()},
                                  sort_keys=True)
                inprog.unlink(missing_ok=True)
                return None
            self._evaluating = False
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

    def _log_wandb(self, rec: dict) -> None:
        run = rec.get("run", {})
        if not self.wandb_enabled or not run.get("wandb", True):
            return
        try:
            if self._wandb is None:
                import wandb

                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
                run_id = "eval-" + hashlib.sha1(str(self.results.resolve()).encode()).hexdigest()[:12]
                name = run.get("name") or self.results.parent.name
                self._wandb = wandb.init(project=run.get("project") or "metalm", entity=run.get("entity"),
                                         id=run_id, resume="allow", mode=mode, job_type="eval",
                                         name=f"{name}-eval", dir=str(self.results))
                self._wandb.define_metric("eval/step")
                self._wandb.define_metric("eval/*", step_metric="eval/step")
            payload = {f"eval/{k}": v for k, v in rec["metrics"].items()}
            payload["eval/step"] = rec["step"]
            payload["eval/tokens"] = rec["tokens"]
            self._wandb.log(payload)
        except Exception as e:  # noqa: BLE001 - logging must never stop evaluation
            log.warning("W&B logging disabled: %s", e)
            self.wandb_enabled = False

    # -- loops
    def poll(self) -> int:
        n = 0
        refs = self.pending()
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

    def run(self, once: bool = False) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.acquire()
            log.info("watching %s every %.0fs; results in %s", self.source, self.every, self.results)
            while not self.stop_requested:
                self.poll()
                if once:
                    break
                deadline = time.time() + self.every
                while not self.stop_requested and time.time() < deadline:
                    time.sleep(min(0.2, max(0.0, deadline - time.time())))
        except Stop:
            log.info("stopped during an evaluation; it will be redone on the next start")
        finally:
            self.release()
            for s, h in old.items():
                signal.signal(s, h)
        return 0


def evaluate_one(path: str, results: Optional[str], overrides: list[str], device: str, wandb: bool,
                 force: bool = False) -> int:
    """--checkpoint PATH: evaluate a single checkpoint, recorded in the same results layout."""
    src_root, name = path.rstrip("/").rsplit("/", 1) if "/" in path.rstrip("/") else (".", path)
    if not STEP_RE.match(name):
        raise ValueError(f"{path}: a checkpoint directory is named step_XXXXXXXX")
    w = Watcher(src_root, results, overrides, 0, device, wandb)
    if force:
        w.result_path(name).unlink(missing_ok=True)
        (w.results / f"{name}.error.json").unlink(missing_ok=True)
    old = {s: signal.signal(s, w._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        w.acquire()
        if w.done(name):
            log.info("%s already evaluated: %s (use --force to redo)", name, w.result_path(name))
            return 0
        loc = dict(w.source.list()).get(name)
        if loc is None or not w.source.complete(loc):
            log.error("%s is not a complete checkpoint", path)
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
    p.add_argument("--once", action="store_true", help="evaluate what is pending, then exit")
    p.add_argument("--results", help="results dir (default RUN/eval; required for URLs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides applied to each checkpoint's config, e.g. eval.metrics=[rank,entropy]")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--force", action="store_true", help="with --checkpoint: evaluate again even if done")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from metalm.config import ConfigError, load_config

    try:
        load_config(None, args.config)  # fail fast on a bad override, before any checkpoint exists
    except ConfigError as e:
        print(f"metalm-evaluate: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        if args.checkpoint:
            return evaluate_one(args.checkpoint, args.results, args.config, args.device, not args.no_wandb,
                                args.force)
        w = Watcher(args.watch, args.results, args.config, args.every, args.device, not args.no_wandb)
        return w.run(once=args.once)
    except (ValueError, RuntimeError, ImportError) as e:  # ImportError: e.g. s3:// without s3fs installed
        print(f"metalm-evaluate: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
