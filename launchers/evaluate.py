"""Asynchronous evaluator: evaluates every complete checkpoint of a run exactly once.

    python launchers/evaluate.py --watch runs/cpu-tiny                      # poll every 5 minutes
    python launchers/evaluate.py --watch runs/cpu-tiny --once --no-wandb    # evaluate what is there, exit
    python launchers/evaluate.py --watch s3://bucket/run --results evals/run --every 10m
    python launchers/evaluate.py --checkpoint runs/cpu-tiny/checkpoints/step_00000100 \
        --config eval.metrics=[rank,entropy,ner] eval.ner.train=ja-train.iob2 eval.ner.test=ja-test.iob2

Results: RUN/eval/step_XXXXXXXX.json (one per checkpoint) and RUN/eval/eval.jsonl; see metalm/eval/watcher.py.
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
