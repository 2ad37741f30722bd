"""The checkpointer of a training run: saves (collective, atomic, failure-tolerant), resumes and prunes the
checkpoints under RUN/checkpoints, in the format of metalm.checkpoint.

It is handed what it saves: the engine (model, optimizer, LR schedule), the data loader (per-rank position),
the run's resolved config and tokenizer; the trainer gives it a TrainerState at each save and gets one back
from `resume`.

Every rank writes its part into `.tmp-step_N/`; the files are fsynced and recorded (size, sha256) in the
COMPLETE marker; rank 0 renames the directory into place and moves `latest`. A write that fails on any rank
is discarded on every rank (`latest` keeps naming the previous complete checkpoint) and retried at the next
interval, up to checkpoint.max_failed_saves consecutive failures, after which the run stops (TrainingError).

With a remote (checkpoint.remote, or a URL train.run_dir), rank 0 hands each saved checkpoint to an `Uploader`
(metalm.train.uploader), which uploads it in the background; the last save of the run waits for the uploads, at
most checkpoint.upload_drain_s seconds and no longer once SIGTERM/SIGINT arrives, and stops the run with an error
naming the checkpoints still staged when one failed for good or did not finish. Each request to the bucket fails
after checkpoint.upload_timeout_s and is not retried inside the client (the uploader's checkpoint.upload_retries
are the only retries), so one upload attempt of a checkpoint's F files takes at most about F x upload_timeout_s.
Resuming takes the newer of the local and the remote
latest complete checkpoint, downloading the remote one first (a fresh machine resumes from the bucket).
"""
from __future__ import annotations

import errno
import shutil
import signal
import threading
import time
from pathlib import Path
from collections.abc import Callable

import yaml

from metalm import checkpoint as ckpt
from metalm.checkpoint import CheckpointError, CheckpointStore, TrainerState, compat
from metalm.config import CheckpointConfig, ConfigError, load_config, to_dict
from metalm.console import warn
from metalm.fsutil import write_atomic
from metalm.storage import Limits, describe, is_url
from metalm.train.dist import Collectives
from metalm.train.engine import Engine
from metalm.train.universal import to_universal
from metalm.train.errors import TrainingError, describe_error
from metalm.train.preflight import check_free_space, free_bytes
from metalm.train.uploader import Uploader


class SaveFailed(Exception):
    """A checkpoint save failed on at least one rank (raised on every rank alike, with the same message)."""


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, root: Path, comm: Collectives, engine: Engine, *, dataloader,
                 config_yaml: str, tokenizer_json: Path | None, estimate_bytes: int,
                 log: Callable[[dict], None], remote: str | None = None, last_step: int | None = None):
        self.cfg, self.root, self.comm, self.engine = cfg, Path(root), comm, engine
        self.remote_url = remote or None
        self.last_step = last_step  # the save at this step is the run's last: it waits for the uploads
        self.remote: CheckpointStore | None = None
        self.uploader: Uploader | None = None
        self.loader, self.config_yaml, self.tokenizer_json = dataloader, config_yaml, tokenizer_json
        self.estimate_bytes = estimate_bytes  # one checkpoint's size, until the first save measures it
        self.last_bytes: int | None = None
        self.failed_saves = 0
        self.saved_step = 0  # the step of the newest checkpoint this run saved or resumed from
        self.log = log
        self.rank = comm.dist.rank

    # ----------------------------------------------------------------------------------------- start

    def prepare(self) -> None:
        """Collective, before training: sweep what interrupted saves and prunes left, and check that the disk
        can hold a checkpoint (a warning when it cannot hold keep_last_k + 1)."""
        err = None
        if self.rank == 0:
            ckpt.clean_stale(self.root)
            if self.cfg.check_free_space:
                try:
                    for warning in check_free_space(self.root, self.estimate_bytes, self.cfg.keep_last_k):
                        warn(warning)
                except TrainingError as e:
                    err = str(e)
            if err is None and self.remote_url:
                err = self._open_remote()
        self.comm.raise_agreed(err, TrainingError)

    def _open_remote(self) -> str | None:
        """Rank 0: the remote is reachable and writable (a probe object), and uploads a killed run left staged
        are queued again. The error message, or None."""
        try:
            self.remote = self._store(self.remote_url)
            self.remote.probe("trainer")
        except Exception as e:  # noqa: BLE001 - any client error (credentials, network, package): one line
            return (f"checkpoint.remote={self.remote_url}: cannot write there ({describe(e)}); check the URL and "
                    f"the credentials in the environment, or unset checkpoint.remote")
        self.uploader = Uploader(self.remote, self.root.parent / ".uploads", self.cfg.keep_last_k,
                                 self.cfg.upload_queue)
        print(f"metalm: checkpoints are saved in {self.root} and uploaded to {self.remote_url}", flush=True)
        left = self.uploader.recover()
        if left:
            print(f"metalm: uploading {', '.join(left)} to {self.remote_url} (left staged by the last run)", flush=True)
        return None

    def _store(self, url: str) -> CheckpointStore:
        """The checkpoints at `url`: each request bounded by checkpoint.upload_timeout_s, tried once by the client
        (the retries are the store's own, checkpoint.upload_retries: the two never multiply)."""
        return CheckpointStore(url, retries=self.cfg.upload_retries,
                               limits=Limits(timeout_s=self.cfg.upload_timeout_s, attempts=1))

    def latest(self) -> Path | None:
        return ckpt.find_latest(self.root)

    def resume(self, now: dict) -> TrainerState | None:
        """Collective: rank 0 picks (and verifies) the checkpoint that checkpoint.resume names and checks that a
        run with `now` (geometry, ZeRO stage, tokenizer hash) can continue it; every rank then loads its part.
        Returns the checkpoint's TrainerState (None: start from scratch). Any problem is a CheckpointError on every
        rank.

        A checkpoint written by another number of processes or ZeRO stage is first converted by rank 0 into
        DeepSpeed's universal format (in `.tmp-step_N-universal/` beside it, removed after the load), which every
        rank then loads into its own partitions. The data position is global (the same in every rank's file);
        a rank the checkpoint did not have takes rank 0's RNG state."""
        if self.cfg.resume == "never":
            return None
        choice, err = None, None
        if self.rank == 0:
            try:
                choice = self._pick(now)
            except CheckpointError as e:
                err = str(e)
        choice, err = self.comm.broadcast((choice, err))
        if err:
            raise CheckpointError(err)
        if choice is None:
            return None
        path, convert = Path(choice[0]), choice[1]
        rank_state, err = None, None
        try:
            state = ckpt.read_state(path)
            saved_world = state.world_size or self.comm.dist.world_size
            rank_state = ckpt.load_rank_state(path, self.rank if self.rank < saved_world else 0)
        except CheckpointError as e:
            err = f"rank {self.rank}: {e}"
        self.comm.raise_agreed(err, CheckpointError)  # before DeepSpeed's collectives: all ranks stop alike
        if convert:
            self._load_converted(path, convert, now["zero_stage"])
        else:
            self.engine.load(str(path))
        data_warning = self.loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])
        self.saved_step = state.step
        if self.rank == 0:
            if data_warning:
                warn(f"resuming from {path}: {data_warning}")
            print(f"metalm: resumed from {path} at step {state.step}", flush=True)
            if self.last_step is not None and state.step >= self.last_step:
                self._finish_uploads()  # nothing left to train: this run's only work is what the last one left
        return state

    def _load_converted(self, path: Path, why: str, zero_stage: int) -> None:
        """Collective: rank 0 converts the checkpoint's DeepSpeed state to the universal format for this run's ZeRO
        stage, every rank loads that, rank 0 removes it."""
        scratch = self.root / f".tmp-{path.name}-universal"
        err = None
        if self.rank == 0:
            print(f"metalm: {path} was written with {why}: converting its DeepSpeed state to the universal "
                  f"format in {scratch}", flush=True)
            shutil.rmtree(scratch, ignore_errors=True)
            started = time.perf_counter()
            try:
                to_universal(path / Engine.TAG, scratch / Engine.TAG, zero_stage)
            except CheckpointError as e:
                err = str(e)
            else:
                print(f"metalm: converted in {time.perf_counter() - started:.1f} s", flush=True)
        self.comm.raise_agreed(err, CheckpointError)
        try:
            self.engine.load(str(scratch), universal=True)
        finally:
            self.comm.barrier()
            if self.rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)

    def _pick(self, now: dict) -> tuple[str, str | None] | None:
        """Rank 0: (the checkpoint to resume from, why its DeepSpeed state needs converting or None), or None."""
        mode = self.cfg.resume
        if mode == "auto":
            path = ckpt.find_latest(self.root, verify=self.cfg.checksums)
            remote = self._remote_latest()
            if remote is not None and (path is None or remote > path.name):
                path = self._download(remote)
            if path is None:
                return None
        elif is_url(mode):
            url = mode.rstrip("/")
            base, _, name = url.rpartition("/")
            if not ckpt.STEP_RE.match(name):
                raise CheckpointError(f"checkpoint.resume={mode}: expected the URL of a checkpoint directory "
                                      f"(.../step_XXXXXXXX)")
            try:
                remote = self._store(base)
                problem = remote.problem(name)
            except OSError as e:
                raise CheckpointError(f"checkpoint.resume={mode}: {describe(e)}") from None
            if problem:
                raise CheckpointError(f"checkpoint.resume={mode}: not a complete checkpoint: {problem}")
            path = self._download(name, remote)
        else:
            path = Path(mode)
            problem = ckpt.checkpoint_problem(path, checksums=self.cfg.checksums) if path.is_dir() \
                else "no such directory"
            if problem:
                raise CheckpointError(f"checkpoint.resume={mode}: {path} is not a complete checkpoint: {problem}")
        state = ckpt.read_state(path)
        mismatch = ckpt.resume_mismatch(state, now)
        if mismatch:
            raise CheckpointError(f"cannot resume from {path}: {mismatch}")
        saved_stage = self._check_changes(path, state)
        return str(path), self._conversion(state, saved_stage, now)

    def _conversion(self, state: TrainerState, saved_stage: int | None, now: dict) -> str | None:
        """Why the checkpoint's DeepSpeed state must go through the universal format to load into this run (its
        number of processes, or a ZeRO stage with another partition layout), or None: it loads as it is. Stage 0
        keeps the whole optimizer state in one file and loads on any number of processes."""
        stage, saved_world, world = now.get("zero_stage"), state.world_size, now["world_size"]
        reasons = []
        if saved_world is not None and saved_world != world and stage != 0:
            reasons.append(f"{saved_world} process(es), this run has {world}")
        shared = {saved_stage, stage} <= set(compat.ZERO_STAGES_SHARING_A_LAYOUT)
        if None not in (saved_stage, stage) and saved_stage != stage and not shared:
            reasons.append(f"ZeRO stage {saved_stage}, this run has {stage}")
        return "; ".join(reasons) or None

    def _check_changes(self, path: Path, state: TrainerState) -> int | None:
        """Rank 0: refuse a resume whose config changes the parameters' shapes, or whose shards are not the
        checkpoint's (unless checkpoint.allow_data_change); warn about config changes that load. Returns the
        checkpoint's ZeRO stage (None when its config cannot be read)."""
        now = yaml.safe_load(self.config_yaml)
        saved_stage = None
        try:
            saved = to_dict(load_config(path / "config.yaml"))
        except ConfigError as e:
            warn(f"{path}/config.yaml cannot be compared with this run's config ({e}); resuming unchecked")
        else:
            saved_stage = saved["train"]["zero_stage"]
            refused, warned = compat.config_changes(saved, now)
            if refused:
                raise CheckpointError(compat.refusal(str(path), refused))
            if warned:
                warn(compat.change_warning(str(path), warned))
        saved_hash = ckpt.load_rank_state(path, 0)["data"].get("data_hash")
        now_hash = self.loader.data_hash
        if saved_hash is None:
            warn(f"{path} does not record its data's fingerprint (written by an older metalm): the shards are "
                  f"checked by sample count and tokenizer only")
        elif saved_hash != now_hash:
            change = compat.data_difference(saved_hash, now_hash, state.data_shards, now["data"]["shards"])
            if not self.cfg.allow_data_change:
                raise CheckpointError(compat.data_refusal(str(path), change))
            warn(compat.data_warning(str(path), change))
        return saved_stage

    def _remote_latest(self) -> str | None:
        if self.remote is None:
            return None
        try:
            return self.remote.latest()
        except Exception as e:  # noqa: BLE001 - the bucket answered the probe: report and refuse, do not guess
            raise CheckpointError(f"checkpoint.remote={self.remote_url}: cannot list its checkpoints: "
                                  f"{describe(e)}") from None

    def _download(self, name: str, remote: CheckpointStore | None = None) -> Path:
        remote = remote or self.remote
        print(f"metalm: downloading checkpoint {name} from {remote.url} (newer than any local one)", flush=True)
        try:
            return remote.download(name, self.root, checksums=self.cfg.checksums)
        except OSError as e:
            raise CheckpointError(f"{remote.url}/{name}: download failed: {describe(e)}") from None

    def _finish_uploads(self) -> None:
        """Rank 0, at the end of the run: wait for the uploads, at most checkpoint.upload_drain_s seconds and not
        beyond a SIGTERM/SIGINT; one that failed for good, or did not finish, stops the run with an error naming
        the checkpoints staged and not uploaded."""
        if self.uploader is None:
            return
        if self.uploader.busy():
            print(f"metalm: waiting for the checkpoint uploads to {self.remote_url} (at most "
                  f"checkpoint.upload_drain_s={self.cfg.upload_drain_s:g} s; SIGTERM or Ctrl-C stops waiting)",
                  flush=True)
        stopped: list[str] = []
        with _signals_noted(stopped):
            failed = self.uploader.drain(timeout=self.cfg.upload_drain_s, stop=lambda: bool(stopped))
        self._log_upload_events()
        pending = self.uploader.pending()
        if not pending:
            return
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        if stopped:
            why = f"stopped by {stopped[0]} while waiting for the checkpoint uploads to {self.remote_url}"
        elif set(pending) - set(failed):
            why = (f"the checkpoint uploads to {self.remote_url} did not finish within checkpoint.upload_drain_s="
                   f"{self.cfg.upload_drain_s:g} s")
        else:
            why = f"checkpoint upload to {self.remote_url} failed"
        raise TrainingError(f"{why}{f' ({detail})' if detail else ''}; not uploaded: {', '.join(pending)}, complete "
                            f"in {self.root} and staged in {self.uploader.staging}: rerun the same command to upload "
                            f"them")

    def _log_upload_events(self) -> None:
        if self.uploader is not None:
            for event in self.uploader.take_events():
                self.log(event)

    # ------------------------------------------------------------------------------------------ save

    def after_step(self, step: int, stopping: bool, state: Callable[[], TrainerState]) -> None:
        """Collective, after every optimizer step: save every checkpoint.every steps, and when the run stops at a
        step not saved yet (`stopping`: identical on every rank). `state` builds the TrainerState when needed."""
        due = step % self.cfg.every == 0 or (stopping and self.saved_step != step)
        if due and self.save(state(), final=stopping):
            self.saved_step = step

    def at_end(self, step: int, state: Callable[[], TrainerState]) -> None:
        """Collective, when training reached its last step: the final save, unless that step is saved already."""
        if self.saved_step != step:
            self.save(state(), final=True)

    def save(self, state: TrainerState, final: bool) -> bool:
        """Collective: write a checkpoint of `state`, with the failure policy; True when saved. A failed save is
        logged and training goes on (retried at the next interval); more than checkpoint.max_failed_saves
        failures in a row, or a failed final save, stop the run (TrainingError on every rank)."""
        try:
            written = self._write(state)
        except SaveFailed as e:
            self.failed_saves += 1
            limit = self.cfg.max_failed_saves
            latest = self.latest()
            latest = f"the last complete checkpoint is {latest}" if latest is not None else \
                "no complete checkpoint exists yet"
            self.log({"step": state.step, "checkpoint_failed": str(e)})
            if final or self.failed_saves > limit:
                why = "the final save" if final else f"{self.failed_saves} failed saves in a row " \
                                                       f"(checkpoint.max_failed_saves={limit})"
                resume = "rerun the same command to resume from it" if self.latest() is not None else \
                    "a rerun starts from step 0"
                raise TrainingError(f"{e}; stopping after {why}; {latest}, {resume}") from None
            if self.rank == 0:
                warn(f"{e}; training goes on and retries at the next checkpoint ({self.failed_saves} of {limit} "
                     f"tolerated failure(s)); {latest}")
            return False
        self.failed_saves = 0
        if self.uploader is not None:  # rank 0
            self._log_upload_events()
            self.uploader.submit(written)
            if final or (self.last_step is not None and state.step >= self.last_step):
                self._finish_uploads()
        return True

    def _write(self, state: TrainerState) -> Path:
        """Collective. A write that fails on any rank (full disk, I/O error) raises SaveFailed on every rank
        after all of them went through the same collectives; the partial directory is removed."""
        name = ckpt.step_dir_name(state.step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        errors: list = []

        def attempt(fn: Callable, *args) -> None:
            if not errors:
                try:
                    fn(*args)
                except Exception as e:  # noqa: BLE001 - recorded, then agreed on by all ranks
                    errors.append(e)

        if self.rank == 0:
            attempt(self._fresh_tmp, tmp)
        self._agree(errors, tmp, state.step)
        self.engine.save(str(tmp), errors)
        attempt(ckpt.save_rank_state, tmp, self.rank, self.loader.state_dict())
        if self.cfg.export_weights:
            with self.engine.gather_for_export() as module:  # collective under ZeRO-3
                if module is not None:
                    attempt(self._write_weights, module, tmp)
        if self.rank == 0:
            attempt(self._write_run_files, tmp, state)
        self._agree(errors, tmp, state.step)
        files = self._record_files(tmp, attempt)
        self._agree(errors, tmp, state.step)
        if self.rank == 0:
            attempt(ckpt.finalize, tmp, final, self.root, self.cfg.keep_last_k, files, state.step)
        self._agree(errors, tmp, state.step)
        self.last_bytes = sum(r["bytes"] for r in files.values())
        return final

    def _fresh_tmp(self, tmp: Path) -> None:
        if self.cfg.check_free_space:
            need = self.last_bytes or self.estimate_bytes
            free = free_bytes(self.root)
            if free < need:
                raise OSError(errno.ENOSPC, f"no room for a checkpoint: {free:,} bytes free, the last one took "
                                            f"{need:,} (checked before writing)", str(self.root))
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    @staticmethod
    def _write_weights(module, tmp: Path) -> None:
        ckpt.save_weights(module.lm, tmp / ckpt.MODEL_FILE)
        if module.head is not None:
            ckpt.save_weights(module.head, tmp / ckpt.HEAD_FILE)

    def _write_run_files(self, tmp: Path, state: TrainerState) -> None:
        write_atomic(tmp / ckpt.CONFIG_FILE, self.config_yaml.encode())
        # DeepSpeed's own pointer to its tag, where its zero_to_fp32.py looks (written here, not by DeepSpeed's
        # save_latest, whose bare open() on rank 0 is outside the collective I/O-error handling)
        write_atomic(tmp / ckpt.DS_POINTER, f"{Engine.TAG}\n".encode())
        ckpt.write_state(tmp, state)
        if self.tokenizer_json is not None and self.tokenizer_json.is_file():
            shutil.copyfile(self.tokenizer_json, tmp / ckpt.TOKENIZER_FILE)

    def _record_files(self, tmp: Path, attempt: Callable) -> dict:
        """fsync, size and sha256 of every file, the files split over the ranks; the merged records on all."""
        d = self.comm.dist
        names = self.comm.broadcast(ckpt.checkpoint_files(tmp) if self.rank == 0 else None)
        mine: dict = {}
        attempt(lambda: mine.update(ckpt.record_files(tmp, names[d.rank::d.world_size], self.cfg.checksums)))
        return {k: v for part in self.comm.gather(mine) for k, v in part.items()}

    def _agree(self, errors: list, tmp: Path, step: int) -> None:
        """Collective: all ranks learn whether any rank's write failed; if so the partial checkpoint goes and
        SaveFailed is raised everywhere with the first failing rank's message."""
        msg = None
        if errors:
            e = errors[0]
            msg = f"rank {self.rank}: {describe_error(e)}"
            if not isinstance(e, OSError):  # torch's zip writer reports a full disk without an errno
                free = free_bytes(self.root)
                if free < (1 << 20):
                    msg = (f"rank {self.rank}: ENOSPC [Errno 28] No space left on device: {self.root} has {free:,} "
                           f"bytes free (the writer reported {describe_error(e)})")
        msg = self.comm.agreed_message(msg)
        if msg is None:
            return
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"checkpoint of step {step} in {tmp} failed: {msg}")


class _signals_noted:
    """While active (main thread only), SIGTERM and SIGINT append their name to `noted` instead of running the
    handlers installed before; those are restored on exit."""

    def __init__(self, noted: list[str]):
        self.noted = noted
        self.old: dict = {}

    def _note(self, signum, frame) -> None:
        self.noted.append(signal.Signals(signum).name)

    def __enter__(self) -> _signals_noted:
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
