"""Command-line flags generated from the config dataclasses, spelled as in Megatron-LM.

``--config`` picks the starting point (a preset name or a YAML file); every config field is then a
flag (``train.micro_batch_size`` -> ``--micro-batch-size``) whose help is the field's docstring.
Only flags given on the command line override the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, Literal

from megatron_yuyuan.config import SECTIONS, RunConfig, load_config
from megatron_yuyuan.dataclass_fields import field_docs, union_members


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_kwargs(tp: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field annotation."""
    (tp,) = [a for a in union_members(tp) if a is not type(None)]  # Optional[X] -> X
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": tp, "metavar": tp.__name__.upper()}


_MANY_WORDS = {("data", "data_prefix")}


class _JoinWords(argparse.Action):
    """A flag taking several words, stored as one string (the config field is a string): joined
    with newlines, which paths do not hold, so a prefix may contain spaces."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, "\n".join(values))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per config field, grouped by section."""
    parser.add_argument(
        "--config", default=None, help="preset name (tiny, small, yuyuan-3.5b) or a YAML run config"
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.splitlines()[0]})")
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            kwargs = _arg_kwargs(hints[f.name])
            if (section, f.name) in _MANY_WORDS:  # --data-prefix 0.7 P1 0.3 P2
                kwargs.update(nargs="+", action=_JoinWords)
            group.add_argument(
                _flag(f.name),
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                help=docs.get(f.name, ""),
                **kwargs,
            )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Load --config, then apply every flag given on the command line."""
    load = vars(args).get("train.load") or vars(args).get("train.pretrained_checkpoint")
    if args.config is None and load:
        from megatron_yuyuan.checkpoint.storage import (
            read_info,
            resolve,
        )  # the checkpoint's own model

        cfg = RunConfig(model=read_info(resolve(load)).model)
    else:
        cfg = load_config(args.config)
    raw = cfg.to_dict()
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in SECTIONS and name:
            raw[section][name] = value
    # Re-validate the merged values through the dataclasses' __post_init__.
    return RunConfig.from_dict(raw, source="command line")


def parse_config(argv: Sequence[str] | None = None, description: str = "") -> RunConfig:
    from megatron_yuyuan.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m megatron_yuyuan.finetune", description=description)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))
