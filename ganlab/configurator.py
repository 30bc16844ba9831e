"""The command line: the constants at the top of a script become its flags, checked before anything is built.

Every upper-case constant of plain type in a script's hyperparameter block is a flag under the
same name (`BATCH_SIZE` is `--batch-size`), its value the default and its comment the help
(karpathy/nanoGPT's configurator, with types and checks). The other flags come in groups, each
defined beside the code that uses it: data (utils.py), the run directory (run_directory.py),
training (loop.py), sampling and scoring (sample.py), speed (speed.py), devices (distribute.py)
and the benchmark (bench.py); each group also checks its own flags. A bad flag or value is one `UsageError` naming
the flag.
"""

import argparse
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from ganlab import bench
from ganlab.devices import distribute
from ganlab.run import directory as run_directory
from ganlab.sampling import sample
from ganlab.devices import speed
from ganlab.run import loop
import utils
from ganlab.errors import UsageError, flag

# A constant in a script's block: NAME = value  # comment (the comment becomes the flag's help).
_CONSTANT_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(?!=)[^#]*?(?:#\s*(.*))?$")

# Checks for the hyperparameters both scripts use, applied to whichever a script defines.
_CHECKS = {
    "epochs": (lambda v: v >= 1, "must be a positive integer"),
    "batch_size": (lambda v: v >= 1, "must be a positive integer"),
    "latent_dim": (lambda v: v >= 1, "must be a positive integer"),
    "kernel_size": (lambda v: v >= 1, "must be a positive integer"),
    "sample_grid": (lambda v: 1 <= v <= 32, "must be an integer from 1 to 32"),
    "limit": (lambda v: v >= 0, "must be 0 (all images) or a positive number of images"),
    "eval_every": (lambda v: v >= 0, "must be 0 (no evaluation) or a positive number of epochs"),
    "dataset": (lambda v: v in ("mnist", "fashion_mnist", "cifar10"), "must be mnist, fashion_mnist or cifar10"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "must be a positive number"),
    "beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "leaky_slope": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "bn_momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "ema": (lambda v: 0 <= v < 1, "must be in [0, 1) (0: no average)"),
    "loss": (lambda v: v in ("ns", "hinge"), "must be ns or hinge"),
    "r1": (lambda v: math.isfinite(v) and v >= 0, "must be 0 (no penalty) or a positive number"),
    "g_steps": (lambda v: 1 <= v <= 10, "must be a whole number from 1 to 10"),
    "seed": (lambda v: 0 <= v <= 2**32 - 1, "must be a whole number from 0 to 4294967295 (2**32 - 1)"),
}


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag, raised as UsageError."""

    def error(self, message):
        raise UsageError(message)


def _read_constants(script_path, namespace):
    """Return [(NAME, comment)] for the script's top-level constants of plain type, in source order."""
    constants = []
    for line in Path(script_path).read_text().splitlines():
        match = _CONSTANT_LINE.match(line)
        if match and match.group(1) in namespace:
            value = namespace[match.group(1)]
            if value is None or isinstance(value, (bool, int, float, str)):
                constants.append((match.group(1), (match.group(2) or "").strip()))
    return constants


def _parse_value(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def parse_config(script_path, namespace, argv=None, description=None, presets=None, preset_key="arch",
                 auto_preset=None):
    """Build the run's configuration from a script's constants and the command line.

    A constant set to None takes its value from the chosen preset (`presets[config[preset_key]]`),
    so each preset carries its own defaults; a preset of 'auto' is chosen by `auto_preset(config)`.
    Returns a SimpleNamespace with lower-case names, `hyperparameters` (the constants' names) and
    `explicit` (those given on the command line). An unknown flag, a wrong type or a bad value
    raises UsageError naming the flag, before any model is built.
    """
    presets = presets or {}
    script_name = Path(script_path).stem
    parser = _OneLineParser(prog=Path(script_path).name, description=description,
                            allow_abbrev=False,  # A flag is its full name, so --resume can tell which were given.
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    names = _add_hyperparameters(parser, script_path, namespace, presets, preset_key, auto_preset)
    utils.add_flags(parser)
    run_directory.add_flags(parser, script_name)
    loop.add_flags(parser)
    sample.add_flags(parser)
    speed.add_flags(parser)
    distribute.add_flags(parser)
    bench.add_flags(parser)

    argv = sys.argv[1:] if argv is None else list(argv)
    config = SimpleNamespace(**vars(parser.parse_args(argv)))
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    config.explicit = {key for key in names if flag(key) in given or flag(key).replace("--", "--no-") in given}
    config.script, config.hyperparameters = script_name, names
    if presets and auto_preset and getattr(config, preset_key) == "auto":
        setattr(config, preset_key, auto_preset(config))
    if presets:  # Fill the preset's defaults for the constants left as None.
        for key, value in presets[getattr(config, preset_key)].items():
            if key in names and getattr(config, key) is None:
                setattr(config, key, value)
    _check_hyperparameters(config)
    for group in (utils, run_directory, loop, sample, speed, distribute, bench):
        group.check_flags(config)
    return config


def _add_hyperparameters(parser, script_path, namespace, presets, preset_key, auto_preset):
    """One flag per constant of the script, in its order; returns their lower-case names."""
    hyper = parser.add_argument_group("hyperparameters (defaults from the constants at the top of the script)")
    names = []
    for name, comment in _read_constants(script_path, namespace):
        key, default = name.lower(), namespace[name]
        names.append(key)
        if default is None:
            preset_values = {p: spec[key] for p, spec in presets.items() if key in spec}
            if not preset_values:
                raise TypeError(f"{name} is None but no preset gives {key!r}")
            kind = type(next(iter(preset_values.values())))
            shown = ", ".join(f"{p}: {v}" for p, v in preset_values.items())
            help_text = f"{comment} (default: from --{preset_key}; {shown})"
        else:
            kind = type(default)
            help_text = f"{comment} (default: {default!r})" if default == "" else f"{comment} (default: {default})"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            hyper.add_argument(flag(name), dest=key, default=default, help=help_text,
                               action=argparse.BooleanOptionalAction)
        else:
            choices = list(presets) + (["auto"] if auto_preset else []) if key == preset_key and presets else None
            hyper.add_argument(flag(name), dest=key, default=default, help=help_text, metavar=kind.__name__.upper(),
                               type=_parse_value(kind), choices=choices)
    return names


def saved_value_problem(key, value, like):
    """What is wrong with a saved (config.json) `value` of hyperparameter `key`, whose flag takes values of
    `like`'s type, as its flag's check would say it; None if nothing."""
    kind = type(like)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return "must be " + {bool: "true or false", float: "a number", int: "a whole number"}.get(kind, "a string")
    if key in _CHECKS and kind is not bool and not _CHECKS[key][0](value):
        return _CHECKS[key][1]
    return None


def _check_hyperparameters(config):
    """Each hyperparameter's own range, and the one rule between two of them (a batch within --limit)."""
    for key in config.hyperparameters:
        value = getattr(config, key)
        if key in _CHECKS and not isinstance(value, bool):
            check, requirement = _CHECKS[key]
            if not check(value):
                raise UsageError(f"argument {flag(key)}: {requirement}, got {value}")
    if config.limit and config.batch_size > config.limit:
        raise UsageError(f"argument --batch-size: {config.batch_size} is larger than the "
                         f"{config.limit} training images of --limit {config.limit}")
