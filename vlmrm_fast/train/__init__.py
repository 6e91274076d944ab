"""Training SAC on VLM-RM rewards: ``vlmrm-fast train`` and its Python API.

- :class:`TrainConfig`, :func:`from_preset` (``"kneeling"``, ``"smoke"``): the run's settings.
- :func:`train`: builds reward model, envs and SAC, trains, checkpoints; ``resume=RUN_DIR`` continues.
- :func:`add_train_parser`: registers ``train`` on an argparse subparsers object.
"""
from typing import TYPE_CHECKING

from vlmrm_fast.train.config import PRESETS, TrainConfig, from_preset

if TYPE_CHECKING:  # what type checkers and IDEs see
    from vlmrm_fast.train.command import add_train_parser
    from vlmrm_fast.train.run import TrainResult, train

__all__ = ["TrainConfig", "PRESETS", "from_preset", "train", "TrainResult", "add_train_parser"]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:  # lazy, so that ``python -m vlmrm_fast.train.run`` imports run.py once
        if name in ("train", "TrainResult"):
            from vlmrm_fast.train import run

            return getattr(run, name)
        if name == "add_train_parser":
            from vlmrm_fast.train.command import add_train_parser

            return add_train_parser
        raise AttributeError(f"module 'vlmrm_fast.train' has no attribute {name!r}")
