"""metalm: meta-learning (FOMAML on SMLMT) mixed into LLaMA-style pretraining, on DeepSpeed."""

__version__ = "0.1.0"
