"""``vlmrm-fast train``: its parser (every :class:`~vlmrm_fast.train.config.TrainConfig` field a flag), the
effective config from a preset, a config file and the flags (or from the run being resumed), and the
handler that runs :func:`~vlmrm_fast.train.run.train` and prints where the run got to.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import textwrap
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from vlmrm_fast.argtypes import CLIError, in_cli_terms, stdout_may_close
from vlmrm_fast.train import checkpoint as ckpt
from vlmrm_fast.train.config import (PRESETS, RESUMABLE_FIELDS, TrainConfig, apply_overrides, field_help, from_preset,
                                     load_config_file, parse_set)
from vlmrm_fast.train.run import (_check_resume_config, _check_resume_folder, _check_sac_device, _resume_checkpoint,
                                  default_run_dir, train)
from vlmrm_fast.train.run_lock import RunFolderBusy, hold_run_folder, refuse_if_held


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Optional[Path]]:
    """The effective config and the run folder to resume (or None), from parsed ``train`` arguments."""
    overrides = parse_set(args.set or [])
    for f in fields(TrainConfig):
        value = getattr(args, f"field_{f.name}", None)
        if value is not None:
            if f.name in overrides:  # which one wins would depend on an order the parser does not keep
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{f.name} is given twice on the command line ({flag} and --set {f.name}=...): "
                                 "give it once")
            overrides[f.name] = value  # converted to the field's type by apply_overrides (net_arch "64,64" too)
    base = from_preset(args.preset) if args.preset else TrainConfig()
    from_file = load_config_file(args.config) if args.config is not None else {}
    base = apply_overrides(base, from_file, f"config file '{args.config}'")
    config = apply_overrides(base, overrides, "the command line")
    if args.preset and config.run_dir is None and args.resume is None:
        config = dataclasses.replace(config, run_dir=str(default_run_dir(args.preset)))
    if args.resume is None:
        _warn_if_given_and_unused(config, set(from_file) | set(overrides))
        return config, None

    run_dir = Path(args.resume)
    # The converted value (TOML reads an unquoted 2024-05-01 as a date), from the flags, else the file.
    asked = config.run_dir if "run_dir" in overrides or "run_dir" in from_file else None
    if asked is not None and Path(asked).resolve() != run_dir.resolve():
        where = "on the command line" if "run_dir" in overrides else f"in '{args.config}'"
        raise ValueError(f"--resume {run_dir} continues the run in its own folder, but run_dir {str(asked)!r} is given "
                         f"{where}: drop it, or copy the run folder there and resume the copy")
    _check_resume_folder(run_dir)
    try:
        with hold_run_folder(run_dir, warn_unlocked=False):  # not while another process writes checkpoints here
            ckpt.clean_stale(run_dir)  # first: it puts back a checkpoint a crash left mid-overwrite
    except (RunFolderBusy, OSError):
        pass  # in use, or not ours to write: reading is safe (--print-config); train() refuses to run beside a holder
    try:
        found = _resume_checkpoint(run_dir, run_dir)
    except (FileNotFoundError, ValueError):
        refuse_if_held(run_dir)  # its first checkpoint still being written, say
        raise
    saved = TrainConfig.from_dict(json.loads((found / "config.json").read_text()), f"checkpoint '{found}'")
    # A preset names a whole config; a config file or flags without one change the saved config.
    given = config if args.preset else apply_overrides(
        apply_overrides(saved, from_file, f"config file '{args.config}'"), overrides, "the command line")
    _check_resume_config(found, given)
    # Of the fields a resumed run may change, those given (in the file or on the command line) change;
    # the others keep the run's own values, not a preset's or the defaults (total_timesteps above all).
    changed = RESUMABLE_FIELDS & (set(from_file) | set(overrides))
    if "pretrained" in from_file or "pretrained" in overrides:
        changed |= {"pretrained"}  # checked above: the same bytes at another path, where the run reads them now
    effective = dataclasses.replace(saved, **{k: getattr(given, k) for k in changed})
    if args.preset:
        kept = sorted(k for k in PRESETS[args.preset] if k in RESUMABLE_FIELDS - changed - {"run_dir"}
                      and getattr(given, k) != getattr(effective, k))
        if kept:
            values = lambda config: ", ".join(f"{k}={getattr(config, k)!r}" for k in kept)  # noqa: E731
            warnings.warn(f"--preset {args.preset} on --resume is checked against the run's config, and its "
                          f"{values(given)} do not change the run, which keeps its {values(effective)}: give those "
                          "as flags (--set KEY=VALUE) to change them", UserWarning, stacklevel=2)
    return dataclasses.replace(effective, run_dir=str(run_dir)), run_dir


def _warn_if_given_and_unused(config: TrainConfig, given: set) -> None:
    """Warn of the fields ``given`` (in a config file or on the command line, not by a preset or the defaults,
    which set them all) that ``config`` does not use: a baseline at alpha 0, an evaluation's settings without
    evaluations."""
    if "baseline" in given and config.baseline and config.alpha == 0:
        warnings.warn("baseline is unused at alpha 0 (the default: the reward is the cosine similarity to the goal); "
                      "give --alpha in (0, 1] to use it", UserWarning, stacklevel=2)
    unused = sorted(given & {"eval_episodes", "video_width", "video_height", "video_length"})
    if unused and config.eval_every == 0:
        warnings.warn(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} unused at eval_every 0 (no "
                      "evaluations); give --eval-every N to evaluate every N steps", UserWarning, stacklevel=2)


def run_train_command(args: argparse.Namespace) -> int:
    """Handler of ``vlmrm-fast train``; exit code 0, or 130/143 after SIGINT/SIGTERM (checkpoint written)."""
    config, resume = config_from_args(args)
    if args.print_config:
        _check_sac_device(config.validate().sac_device)  # what would run, so what would be refused is refused here too
        with stdout_may_close():  # `--print-config | head`: quiet, as score --out - is
            print(config.to_json(), flush=True)
        return 0
    try:
        result = train(config, resume=resume)
    except ValueError as error:  # the reward model's, written for Python callers: name this command's flags instead
        raise CLIError(in_cli_terms(str(error), dtype_flag="--reward-dtype", backend_flag="--reward-backend",
                                    batch_flag="--reward-batch-size", device_flag="--reward-device")) from None
    where = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint"
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.num_timesteps}; {where}; continue with: "
              f"vlmrm-fast train --resume {shlex.quote(str(result.run_dir))}", file=sys.stderr)
        return 130 if result.stopped_by == "SIGINT" else 143
    if result.evaluated_only:
        print(f"{result.run_dir} is at step {result.num_timesteps}, its total_timesteps; its final evaluation, missed "
              f"earlier, is done and in {where}. Continue it with: vlmrm-fast train --resume "
              f"{shlex.quote(str(result.run_dir))} --total-timesteps N (N > {result.num_timesteps})")
        return 0
    if result.steps_this_session == 0:
        print(f"{result.run_dir} is already at step {result.num_timesteps}, at or past total_timesteps "
              f"({config.total_timesteps}); nothing to train. Continue it with: vlmrm-fast train --resume "
              f"{shlex.quote(str(result.run_dir))} --total-timesteps N (N > {result.num_timesteps})")
        return 0
    rate = result.steps_this_session / max(result.learn_seconds, 1e-9)
    print(f"trained {result.steps_this_session} steps, to step {result.num_timesteps}, in {result.learn_seconds:.1f} s "
          f"({rate:.1f} steps/s; {result.seconds:.1f} s with set-up); {where}; logs in {result.run_dir / 'tb'}")
    return 0


EPILOG = textwrap.dedent("""\
    config layers (later wins): TrainConfig defaults (the paper's) < --preset < --config FILE
    (TOML or .json, flat key = value; tables are flattened) < --set KEY=VALUE and the flags above
    (a field by one or the other, not both).
    The effective config is saved in RUN_DIR/config.json and in every checkpoint.

    rewards: --reward-timing step scores all envs' frames each env step (one batch per step);
    deferred (the paper) keeps a rollout's frames on the reward device and scores them in one batch
    before the gradient steps, writing the rewards into the replay buffer.

    outputs in RUN_DIR: tb/ (TensorBoard: rollout/vlm_return, rollout/gt_return, time/steps_per_s
    (env steps per wall-clock second since the last row, evaluations and checkpoints included),
    time/train_steps_per_s (the same without them), time/render_s, time/reward_s,
    time/sac_update_s, time/env_s, time/eval_s, time/checkpoint_s (seconds per rollout; the last
    two are what the row's evaluations and checkpoint writes took, spread over its rollouts; the
    final evaluation and checkpoint come after the last row), time/total_timesteps, SB3's train/*,
    and eval/vlm_return (scored at the training frame size), eval/gt_return, eval/seconds (the
    evaluation's own time) with --eval-every; the same rows in progress.csv (an evaluation's in a
    row of its own, with SB3's train/* recorded since the row before), and progress-from-STEP.csv per
    resumed session that logs a row: read in order of STEP, the files hold each step's row once: a
    session resumed after a crash drops the rows it logs again from the earlier files, kept whole in
    tb/superseded/), checkpoints/ (every --checkpoint-every steps, at the end and on SIGINT/SIGTERM;
    written atomically), videos/ (mp4 every --eval-every steps).

    examples:
      vlmrm-fast train --preset smoke
      vlmrm-fast train --preset kneeling --run-dir runs/kneel --set alpha=0.5
      vlmrm-fast train --config my_run.toml --n-envs 8 --reward-timing step
      vlmrm-fast train --resume runs/kneel            # after a crash, SIGINT or SIGTERM
    """)


class _GivenOnce(argparse.Action):
    """Store the value, refusing a second one: two --config files (or presets, or runs) read as layers, where
    argparse would keep the last and drop the first without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} is given twice ({getattr(namespace, self.dest)} and {values}); it takes one: "
                         "give the other's settings as flags (--set KEY=VALUE), which win over the file's"
                         if self.dest == "config" else f"{option_string} is given twice; give it once")
        setattr(namespace, self.dest, values)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on ``subparsers``; sets ``handler=run_train_command``."""
    p = subparsers.add_parser(
        "train", help="train SAC on CLIP (VLM-RM) rewards", description="Train a SAC agent (stable-baselines3) on "
        "VLM-RM rewards: a CLIP model scores rendered frames against a goal prompt.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), action=_GivenOnce,
                   help="kneeling: the paper's ViT-bigG-14 humanoid run; smoke: a tiny CPU run")
    p.add_argument("--config", type=Path, metavar="FILE", action=_GivenOnce, help="TOML (or .json) config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (repeatable)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", action=_GivenOnce,
                   help="continue the run in RUN_DIR from its latest complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    group = p.add_argument_group("config fields (override the preset and the config file; defaults without a preset)")
    docs = field_help()
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = docs[f.name]
        if "default" not in text:
            text += f" (default: {_shown_default(getattr(defaults, f.name))})"
        kwargs = dict(dest=f"field_{f.name}", default=None, help=text.replace("%", "%%"))
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name in ("goal", "baseline"):
            group.add_argument(flag, action="append", metavar="TEXT", **kwargs)
        elif f.name == "env_kwargs":
            group.add_argument(flag, metavar="JSON", **kwargs)
        else:
            group.add_argument(flag, metavar=f.name.split("_")[-1].upper(), **kwargs)
    p.set_defaults(handler=run_train_command)
    return p


def _shown_default(value: Any) -> str:
    """A field's default as a user would type it after its flag (or --set)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
