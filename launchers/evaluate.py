"""Asynchronous evaluator: evaluates every complete checkpoint of a run exactly once.

    python launchers/evaluate.py --watch runs/cpu-tiny                      # poll every 5 minutes
    python launchers/evaluate.py --watch runs/cpu-tiny --once --no-wandb    # evaluate what is there, exit
    python launchers/evaluate.py --watch s3://bucket/run --results evals/run --every 10m
    python launchers/evaluate.py --checkpoint runs/cpu-tiny/checkpoints/step_00000100 \
        --config eval.metrics=[rank,entropy,ner] eval.ner.train=ja-train.iob2 eval.ner.test=ja-test.iob2

    python launchers/evaluate.py --watch runs/new-run --wait-for-dir   # started before the trainer creates it
    python launchers/evaluate.py --watch runs/cpu-tiny --once --shards /data/wiki/shards   # val_loss from these

Results: RUN/eval/step_XXXXXXXX.json (one per checkpoint) and RUN/eval/eval.jsonl; see metalm/eval/watcher.py.
Exit status: 0 done; 1 an evaluation failed (--once, --checkpoint); 2 refused before touching any checkpoint
(unknown device or no GPU for --device cuda, a bad --config override, a missing --watch directory, --shards
without manifest.json), with one line on stderr saying why.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metalm.eval.watcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
