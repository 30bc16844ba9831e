"""The settings of a run: the script's constants and the command line, resolved once, then frozen.

Every upper-case constant of plain type in a script's hyperparameter block is a flag under the
same name (`BATCH_SIZE` is `--batch-size`), its value the default and its comment the help
(karpathy/nanoGPT's configurator, with types and checks). The other flags come in groups, each
with its checks (flags.py): data, the run directory, training, sampling and scoring, speed, devices
and the benchmark. A bad flag or value is one `UsageError` naming the flag, before anything is built.

Parsing (`parse`) loads no TensorFlow, so that a script run from the command line answers `--help`
and a bad flag or constant before TensorFlow's 5 s start (`answer_early`, called by ganlab/__init__.py
before it loads TensorFlow); the steps after it, devices and the strategy, import theirs as they run.

`resolve` is the one place the settings are made, in this order: the flags, then the preset
(`--arch`, whose architecture joins the settings), then a resumed run's saved settings, then the
devices and the precision, then the strategy. Then they are frozen (a frozen dataclass): every
module reads them, none writes them, and every field is always there.
"""

import argparse
import ast
import contextlib
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

import utils
from ganlab import errors, flags
from ganlab.errors import DataError, UsageError, flag
from ganlab.datasets import cifar10, downloads, folder
from ganlab.run import directory as run_directory
from ganlab.run.directory import RunDirectory

# A constant in a script's block: NAME = value  # comment (the comment becomes the flag's help).
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_CONSTANT_LINE = re.compile(rf"^({_CONSTANT_NAME.pattern})\s*=\s*(?!=)[^#]*?(?:#\s*(.*))?$")

# Checks for the hyperparameters both scripts use, applied to whichever a script defines.
_CHECKS = {
    "epochs": (lambda v: v >= 1, "must be a positive integer"),
    "batch_size": (lambda v: v >= 1, "must be a positive integer"),
    "latent_dim": (lambda v: v >= 1, "must be a positive integer"),
    "kernel_size": (lambda v: v >= 1, "must be a positive integer"),
    "sample_grid": (lambda v: 1 <= v <= 32, "must be an integer from 1 to 32"),
    "limit": (lambda v: v >= 0, "must be 0 (all images) or a positive number of images"),
    "eval_every": (lambda v: v >= 0, "must be 0 (no evaluation) or a positive number of epochs"),
    "dataset": (lambda v: v in ("mnist", "fashion_mnist", "cifar10", "folder"),
                "must be mnist, fashion_mnist, cifar10 or folder (your own pictures, in --data-dir)"),
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
    "augment": (lambda v: all(policy in ("color", "translation", "cutout") for policy in v.split(",") if policy),
                "must be empty or a comma-separated list of color, translation and cutout"),
}


# The type of each hyperparameter the scripts name, so that an edited constant of the wrong type is one
# line naming it (a whole float such as 20.0 is taken as an integer).
KINDS = dict(epochs=int, batch_size=int, limit=int, latent_dim=int, kernel_size=int, sample_grid=int, eval_every=int,
             g_steps=int, seed=int, lr=float, beta1=float, beta2=float, r1=float, ema=float, dropout=float,
             leaky_slope=float, bn_momentum=float, dataset=str, classes=str, loss=str, augment=str, arch=str,
             conditional=bool)
# The hyperparameters the machinery (ganlab) reads of every script: each must be a constant at its top.
REQUIRED = ("epochs", "batch_size", "limit", "dataset", "classes", "conditional", "latent_dim", "lr", "beta1", "beta2",
            "loss", "r1", "ema", "augment", "seed", "sample_grid", "eval_every")
_KIND_NAMES = {bool: "True or False", int: "a whole number", float: "a number", str: "a string in quotes"}


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


def _of_kind(key, value, where):
    """`value` of hyperparameter `key` as its type (KINDS), a whole float taken as an integer and an integer
    as a float; UsageError naming `where` (the constant or preset entry it came from) otherwise."""
    kind = KINDS.get(key)
    if kind is None or value is None or (type(value) is kind):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise UsageError(f"{where} = {value!r} at the top of the script: must be {_KIND_NAMES[kind]}")


def _check_constants(script_path, namespace, names, presets):
    """Issue 41, 5: every constant the machinery or the script's own code reads is there (a deleted line would be
    an AttributeError after TensorFlow has started), and each preset entry is of its hyperparameter's type."""
    script = Path(script_path).name
    used = set(re.findall(r"(?<![.\w])config\.([a-z_][a-z0-9_]*)", Path(script_path).read_text()))
    for key in sorted(set(REQUIRED) | (used & set(KINDS))):
        if key not in names and key.upper() in namespace:  # There, but not of a plain type (a list, say).
            _of_kind(key, namespace[key.upper()], f"{script}: {key.upper()}")
        if key not in names:
            raise UsageError(f"{script}: the constant {key.upper()} is missing from the top of the script (its "
                             f"{flag(key)} is read in training); put its line back")
    for preset, spec in presets.items():
        for key, value in spec.items():
            _of_kind(key, value, f"{script}: PRESETS[{preset!r}][{key!r}]")


def _parse_value(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


# What --resume may change: the length of the run and how often it is scored; --lr only downwards,
# to continue after a divergence. Anything else would make the resumed run a different experiment.
RESUMABLE_CHANGES = ("epochs", "eval_every")

# Fields that every script's settings hold, with these values unless its constants or preset set them.
COMMON = dict(arch=None,  # no presets: the script has one architecture
              g_steps=1,  # one G update per D update
              bf16_on_cpu=True)  # --precision auto may pick bf16 on a CPU that computes it natively

# The fields that the later steps of `resolve` decide, as they stand before them: a fresh run on one device.
UNRESOLVED = dict(restart=False,  # a --resume of a run killed before its first checkpoint starts afresh
                  lr_change=None,  # (saved, new) when --resume lowers --lr
                  replicas=1, chief=True,  # the strategy's replica count; whether this process writes the run
                  task=None,  # "worker 1" and the like, in a cluster
                  step_multiply_adds=0,  # a step's forward passes (`step_multiply_adds`): --distribute auto's rule
                  saved_precision=None)  # on --resume, the precision the run trained in (its config.json)


def resolve(script_path, namespace, argv=None, description=None, presets=None, auto_preset=None,
            default_steps_per_call=1):
    """The run's settings, resolved once in this order and then frozen: the flags, the preset, a resumed
    run's saved settings, the devices and precision, the strategy.

    Returns (settings, run, strategy): `run` the RunDirectory this process trains into (checked,
    nothing written), `strategy` the tf.distribute strategy. With --generate, --interpolate or
    --evaluate, which serve a trained run, only the flags and the preset are resolved and the
    strategy is None. `default_steps_per_call` is the script's choice for --steps-per-call 0 on the CPU.
    """
    from ganlab.devices import distribute  # TensorFlow's: see the module's docstring.

    values = parse(script_path, namespace, argv, description, presets, auto_preset)
    run = RunDirectory(values["out"])
    sampling = values["generate"] or values["interpolate"] or values["evaluate"]
    unusable = None if values["cpu"] else errors.unusable_gpus()
    if unusable and not sampling:  # Minutes of work would take hours on the CPU, in silence.
        raise UsageError(f"{unusable}; or train on the CPU anyway with --cpu")
    if unusable:
        print(f"{Path(script_path).name}: warning: {unusable}; it samples on the CPU", file=sys.stderr, flush=True)
    if sampling:
        distribute.use_gpus("off")  # One GPU, its memory as it grows, as a run on one device.
        return freeze(values), run, None
    values["distribute"] = distribute.choose(values["distribute"])  # A cluster's, or still auto: see with_devices.
    values["chief"], values["task"] = distribute.place(values["distribute"])
    if values["chief"] and not values["benchmark"]:
        run.check_start(values["resume"], values["overwrite"])
    saved = run.read_config() if values["resume"] and not values["benchmark"] else {}
    if saved:  # Its architecture and data, as it trained (--arch, --dataset), not the command line's defaults.
        values = _data_and_preset(values | saved_settings(run, saved, values), presets, auto_preset)
    values["saved_precision"] = saved.get("precision") if saved else None
    settings = freeze(with_devices(values, default_steps_per_call))
    strategy = distribute.create(settings)
    return settings, run if settings.chief else run_directory.worker_directory(settings.task, run), strategy


def answer_early(script_path, argv):
    """Answer the command line of a script run as `python gan_mnist.py ...` before TensorFlow loads (its 5 s):
    `--help`, or a bad flag, value or constant, in the words and exit status the full run would give
    (`parse` under `errors.run_main`), from the script's source read without running it (`_as_written`).

    Returns, saying nothing, when the command line passes (the run then parses it again, in full) or
    when the script cannot be read so (a constant computed, say): the full run answers as ever.
    """
    try:
        arguments = _as_written(script_path)
    except (OSError, SyntaxError, ValueError):
        return
    if arguments is None:
        return
    said, errors_said = io.StringIO(), io.StringIO()  # What parse prints (--arch auto's choice): shown only on a stop.
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(errors_said):
            errors.run_main(lambda argv: parse(script_path, argv=argv, **arguments), argv)
    except SystemExit:  # --help, or a one-line error.
        print(said.getvalue(), end="", flush=True)
        print(errors_said.getvalue(), end="", file=sys.stderr, flush=True)
        raise
    except Exception:  # A script of the user's that only running it can read: the full run answers.
        return


def _as_written(script_path):
    """`parse`'s arguments for the script, read from its source: its top-level constants as `namespace`, its
    docstring, and the `presets` and `auto_preset` (its function alone) its `configurator.resolve(...)` names.
    None if they cannot be had without running it (a constant that is not a literal, or bound another way), or
    if the script calls no `configurator.resolve` (a tool of its own, say)."""
    tree = ast.parse(Path(script_path).read_bytes())
    namespace, functions = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
              and _CONSTANT_NAME.fullmatch(node.targets[0].id)):
            try:
                namespace[node.targets[0].id] = _literal(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        elif not isinstance(node, ast.ClassDef) and any(
                isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store) and _CONSTANT_NAME.fullmatch(name.id)
                or isinstance(name, ast.alias) and _CONSTANT_NAME.fullmatch(name.asname or name.name)
                for name in ast.walk(node)):
            return None
    call = next((node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr == "resolve" and getattr(node.func.value, "id", None) == "configurator"), None)
    named = {keyword.arg: keyword.value for keyword in call.keywords} if call else {}
    if call is None or not all(isinstance(value, ast.Name) for key, value in named.items()
                               if key in ("description", "presets", "auto_preset")):
        return None
    if "description" in named and named["description"].id != "__doc__":
        return None
    arguments = dict(namespace=namespace, description=ast.get_docstring(tree, clean=False)
                     if "description" in named else None)
    if "presets" in named:
        if named["presets"].id not in namespace:
            return None
        arguments["presets"] = namespace[named["presets"].id]
    if "auto_preset" in named:
        function = functions.get(named["auto_preset"].id)
        if function is None or function.decorator_list:
            return None
        defined = dict(namespace)
        exec(compile(ast.Module([function], type_ignores=[]), str(script_path), "exec"), defined)
        arguments["auto_preset"] = defined[function.name]
    return arguments


def _literal(node):
    """The value of a constant's expression if it is a literal, `dict(key=literal, ...)` too (the presets');
    ValueError otherwise."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(keyword.arg is None for keyword in node.keywords):
            raise ValueError("dict(**...)")
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return (list if isinstance(node, ast.List) else tuple)(_literal(element) for element in node.elts)
    return ast.literal_eval(node)


def with_devices(values, default_steps_per_call=1):
    """`values` with the devices taken and the replica count, precision, XLA and steps per call resolved
    (`speed.choose`, from the step's work, `step_multiply_adds`); a worker that is not the chief leaves
    the evaluation to it. UsageError for a batch smaller than the replica count."""
    from ganlab.devices import distribute, speed  # TensorFlow's: see the module's docstring.
    from ganlab.sampling import sample

    values = dict(values, step_multiply_adds=step_multiply_adds(values))
    if values["cpu"]:
        distribute.use_gpus("off", cpu=True)  # No GPU is visible from here on.
    values["distribute"] = distribute.choose(values["distribute"], values["step_multiply_adds"])
    values["replicas"] = distribute.take_devices(values["distribute"], values["cpu_devices"], values["cpu"])
    if values["cpu_devices"] and values["distribute"] != "mirrored":  # Issue 41, 11: said, not ignored.
        print(f"--cpu-devices {values['cpu_devices']}: the CPU's logical devices serve --distribute mirrored only; "
              f"this run trains on one device (--distribute {values['distribute']})")
    requested = values["precision"]
    values |= speed.choose(values, default_steps_per_call)
    if values.get("saved_precision") and values["saved_precision"] != values["precision"] and (
            "fp16" in (values["saved_precision"], values["precision"])):
        print(f"The run trained in {values['saved_precision']} and goes on in {values['precision']} (--precision "
              f"{'auto on this machine' if requested == 'auto' else requested}): its optimizers "
              + ("drop their loss scale" if values["saved_precision"] == "fp16" else "gain a fresh loss scale"))
    if not values["chief"]:
        values["eval_every"] = 0  # The chief scores the run.
    if values["eval_every"] and len(values["class_names"]) < 2:
        print(f"No evaluation: {values['data_dir']} has no class subfolders (two or more), and the Fréchet distance "
              f"and the other figures come from a classifier of its classes; the grids, losses and GIF still come")
        values["eval_every"] = 0
    too_small = values["eval_every"] and values["class_sizes"] and sample.too_small_to_score(
        values["class_names"], values["class_sizes"], utils.parse_classes(values["classes"], values["class_names"],
                                                                          values["dataset"]))
    if too_small:
        print(f"No evaluation: in {values['data_dir']}, {too_small}; the grids, losses and GIF still come")
        values["eval_every"] = 0
    if values["batch_size"] < values["replicas"]:
        raise UsageError(f"argument --batch-size: {values['batch_size']} is smaller than the {values['replicas']} "
                         f"replicas of --distribute {values['distribute']}, each of which needs an image")
    return values


def step_multiply_adds(values):
    """The multiply-adds of a training step's forward passes, G's and D's on the global batch: the script's
    `multiply_adds(settings)` (one image through both models) times --batch-size; 0 if it has none."""
    per_image = values.get("multiply_adds")
    return int(per_image(freeze(values)) * values["batch_size"]) if per_image else 0


def freeze(values):
    """`values` (a dict of every field) as the frozen settings: a dataclass whose fields cannot be set."""
    Settings = dataclasses.make_dataclass("Settings", list(values), frozen=True)
    return Settings(**values)


def parse(script_path, namespace, argv=None, description=None, presets=None, auto_preset=None):
    """The settings as the flags and the preset give them, checked: a dict of every field.

    A constant set to None takes its value from the chosen preset (`presets[arch]`), so each preset
    carries its own defaults; `--arch auto` is chosen by `auto_preset(values)`; the preset's other
    keys (its architecture) join the settings. Besides the hyperparameters (lower-case names) and
    the other flags, the dict holds `script`, `hyperparameters` (the constants' names), `explicit`
    (those given on the command line), COMMON and UNRESOLVED. An unknown flag, a wrong type or a
    bad value raises UsageError naming the flag, before any model is built.
    """
    presets = presets or {}
    script_name = Path(script_path).stem
    parser = _OneLineParser(prog=Path(script_path).name, description=description,
                            allow_abbrev=False,  # A flag is its full name, so --resume can tell which were given.
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    names = _add_hyperparameters(parser, script_path, namespace, presets, auto_preset)
    _check_constants(script_path, namespace, names, presets)
    flags.add_flags(parser, script_name)

    argv = sys.argv[1:] if argv is None else list(argv)
    values = vars(parser.parse_args(argv))
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    values |= dict(script=script_name, hyperparameters=tuple(names), multiply_adds=namespace.get("multiply_adds"),
                   explicit=frozenset(key for key in names if flag(key) in given
                                      or flag(key).replace("--", "--no-") in given),
                   constants=tuple((key, parser.get_default(key)) for key in names))
    try:
        values = _data_and_preset(values | UNRESOLVED, presets, auto_preset)
        _check_hyperparameters(values)
        checked = freeze(values)  # Checks only check.
        flags.check_flags(checked)
    except UsageError as error:
        raise _naming_the_constant(error, values) from None
    # --num-samples 0: the MNIST test set's 10,000; a folder's own picture count, up to that.
    values["num_samples"] = values["num_samples"] or min(10_000, values["data_images"] or 10_000)
    values["out"] = run_directory.default_out(values["out"], script_name,
                                              values["data_dir"] if values["dataset"] == "folder" else None)
    values["batch_sizes"] = flags.batch_sizes(values["batch_sizes"])
    return values


def _naming_the_constant(error, values):
    """A UsageError about a hyperparameter's flag that the user never passed, reworded to name where its value
    came from: the constant at the top of the script, or the preset's entry (issue 41, 5)."""
    match = re.match(r"argument (--[a-z0-9-]+): (.*)", str(error), re.DOTALL)
    key = match and match.group(1)[2:].replace("-", "_")
    if (not match or key not in values["hyperparameters"] or key in values["explicit"]
            or any(flag(given) in match.group(2) for given in values["explicit"])):  # A rule between two flags.
        return error
    script, constant = f"{values['script']}.py", dict(values["constants"])[key]
    where = (f"{script}: PRESETS[{values['arch']!r}][{key!r}] = {values[key]!r}" if constant is None
             else f"{script}: {key.upper()} = {constant!r} at the top of the script")
    return UsageError(f"{where}: {match.group(2)}")


def _data_and_preset(values, presets, auto_preset):
    """`values` with the data's fields (`_data`) and the preset's: `--arch auto` chosen by
    `auto_preset(settings)`, the constants left None and the architecture (`g_start`, ...) from
    `presets[arch]`, COMMON where neither the script nor the preset sets a field; then `data_shape`."""
    values = values | {key: value for key, value in COMMON.items() if key not in values["hyperparameters"]}
    values |= _data(values)
    if presets:
        if auto_preset and values["arch"] == "auto":
            values["arch"] = auto_preset(freeze(values))
            if values["dataset"] == "folder":
                print(f"--arch auto: {values['arch']}, the preset nearest the pictures' own side "
                      f"(their median shorter side: {values['data_side']} px)")
        if values["arch"] not in presets:
            raise UsageError(f"argument --arch: {values['arch']} is not a preset ({', '.join(presets)})")
        values |= {key: _of_kind(key, value, f"PRESETS[{values['arch']!r}][{key!r}]")
                   for key, value in presets[values["arch"]].items()
                   if key not in values["hyperparameters"] or values[key] is None}
    return values | {"data_shape": _data_shape(values)}


def _data(values):
    """The data's own side (`data_side`), channels and `class_names`: a named dataset's, or a folder's from
    its images' headers (ganlab/datasets/folder.py). Before the preset: --arch auto follows the side."""
    check, requirement = _CHECKS["dataset"]
    if not check(values["dataset"]):
        raise UsageError(f"argument --dataset: {requirement}, got {values['dataset']}")
    if values["dataset"] != "folder":
        _check_data_dir(values["data_dir"], values["dataset"])
        height, _, channels = utils.DATASETS[values["dataset"]].shape
        return dict(data_side=height, data_channels=channels, class_names=tuple(utils.DATASETS[values["dataset"]].classes),
                    data_images=0, class_sizes=())
    if not values["data_dir"]:
        raise UsageError("argument --data-dir: --dataset folder trains on the pictures in --data-dir; name the folder")
    found = folder.probe(values["data_dir"])
    if values["conditional"] and not found.class_names:
        raise UsageError(f"argument --conditional: {found.root} has no class subfolders, so no labels to condition "
                         f"on; put each class's pictures in a subfolder of its own")
    return dict(data_side=found.side, data_channels=found.channels, class_names=found.class_names,
                data_images=len(found.files),
                class_sizes=tuple(int(n) for n in np.bincount(found.labels, minlength=len(found.class_names))))


def _check_data_dir(data_dir, dataset):
    """Issue 41, 1: a --data-dir for a named dataset must hold its files or be empty (a download goes there);
    one of pictures is a folder of one's own, which --dataset folder reads, never a place to download into."""
    directory = Path(data_dir).expanduser() if data_dir else None
    if directory is None or not directory.is_dir():
        return
    entries = list(directory.iterdir())
    names = {entry.name.removesuffix(".gz") for entry in entries}
    wanted = set(cifar10.FILES["train"] + cifar10.FILES["test"]) if dataset == "cifar10" else {
        name for split in downloads.IDX_FILES.values() for name in split}
    if not entries or names & wanted:
        return
    pictures = [entry for entry in entries if entry.suffix.lower() in folder.FORMATS] + [
        picture for entry in entries if entry.is_dir() for picture in entry.iterdir()
        if picture.suffix.lower() in folder.FORMATS]
    if pictures:
        raise UsageError(f"argument --data-dir: {directory} holds pictures, not {dataset}'s files; to train on "
                         f"them, add --dataset folder")
    raise UsageError(f"argument --data-dir: {directory} holds none of {dataset}'s files and is not empty, so "
                     f"nothing is downloaded into it; name the directory of {dataset}'s files, or an empty one")


def _data_shape(values):
    """The shape (S, S, C) the dataset is read in: a named dataset's own; a folder's pictures at the preset's
    side (the fully-connected GAN, without presets: 28, or 32 for pictures larger than 30 px)."""
    if values["dataset"] != "folder":
        return tuple(utils.DATASETS[values["dataset"]].shape)
    side = values["image_size"] if values["arch"] else 28 if values["data_side"] <= 30 else 32
    return (side, side, values["data_channels"])


def saved_settings(run, saved, values):
    """--resume: what the run's saved settings (`saved`, its config.json) change in `values`.

    Every hyperparameter not given on the command line takes the run's saved value; one given with
    another value is refused (except RESUMABLE_CHANGES and a lower --lr), naming each difference; a
    hand-edited value that its flag would refuse is refused too. A run that has trained but lost
    its checkpoints is refused (its outputs are kept); one killed before its first checkpoint
    starts again from scratch with its saved settings.
    """
    if saved.get("script") != values["script"]:
        raise UsageError(f"argument --resume: {run.path} holds a {saved.get('script')} run, "
                         f"not a {values['script']} run")
    changes, differences = {}, []
    edited = edited_constants(saved, values)
    for key in values["hyperparameters"]:
        if key not in saved:
            continue
        given = key in values["explicit"] or key in edited  # A constant edited since is taken as its flag.
        problem = saved_value_problem(key, saved[key], values[key])
        if problem and not (given and key in RESUMABLE_CHANGES):  # Hand-edited: refused as its flag would be.
            raise DataError(f"{run.config}: \"{key}\" is {json.dumps(saved[key])}: {problem} "
                            f"(as {flag(key)}); correct it, or start a new run with --out")
        if given and values[key] != saved[key]:
            named = flag(key) if key in values["explicit"] else edited[key]
            if key == "lr" and values[key] < saved[key]:
                changes["lr_change"] = (saved[key], values["lr"])
            elif key not in RESUMABLE_CHANGES:
                differences.append(f"{named} {values[key]} (the run has {saved[key]})")
            if key in edited and (key in RESUMABLE_CHANGES or "lr_change" in changes and key == "lr"):
                print(f"{edited[key]} {values[key]}, edited since the run started: taken (the run had {saved[key]})")
        else:
            changes[key] = saved[key]
    if changes.get("dataset", values["dataset"]) == "folder" and not values["data_dir"]:
        changes["data_dir"] = saved.get("data_dir")  # The run's own pictures, unless --data-dir names them anew.
    class_names = _data(values | changes)["class_names"]  # Of the run's own dataset (a folder: probed once here).
    if "class_names" in saved and list(saved["class_names"]) != list(class_names):
        raise DataError(f"{run.config}: the run trained on the classes {', '.join(saved['class_names']) or '(none)'}, "
                        f"and {values['data_dir'] or changes.get('data_dir')} now holds "
                        f"{', '.join(class_names) or 'no class subfolders'}; "
                        f"restore its subfolders, or start a new run with --out")
    if "classes" in saved:
        try:
            utils.parse_classes(saved["classes"], class_names, changes.get("dataset", values["dataset"]))
        except UsageError as error:
            raise DataError(f"{run.config}: \"classes\" is {json.dumps(saved['classes'])}: "
                            f"{str(error).split(': ', 1)[-1]}; correct it, or start a new run with --out") from None
    changes["deterministic"] = values["deterministic"] or bool(saved.get("deterministic"))  # A repeatable run stays so.
    if differences:
        raise UsageError(f"argument --resume: {run.path} was trained with other settings: "
                         f"{'; '.join(differences)} (only --epochs, --eval-every and a lower --lr may change). "
                         f"Put it back, or start a new run with --out, or --overwrite")
    if not run.checkpoint_prefixes():
        trained = run.trained_outputs()
        if trained:  # Its checkpoints were deleted (to save space, say): starting over would wipe its outputs.
            raise UsageError(f"argument --resume: {run.path} has trained ({', '.join(trained[:3])}"
                             f"{', ...' if len(trained) > 3 else ''}) but holds no checkpoint to go on from; "
                             f"its outputs are kept (nothing was touched): --overwrite starts it again")
        print(f"{run.checkpoints}: no checkpoint yet (the run stopped before its first); "
              f"starting it from scratch with its saved settings")
        changes |= dict(resume=False, restart=True)
    return changes


def edited_constants(saved, values):
    """Issue 41, 6: the constants at the top of the script whose value has changed since the run started (its
    config.json's "constants"), not given as flags: {key: "NAME at the top of script.py"}."""
    then, now = saved.get("constants"), dict(values["constants"])
    if not isinstance(then, dict):  # A run from before constants were recorded.
        return {}
    return {key: f"{key.upper()} at the top of {values['script']}.py" for key, value in now.items()
            if key in then and then[key] != value and key not in values["explicit"]}


def _add_hyperparameters(parser, script_path, namespace, presets, auto_preset):
    """One flag per constant of the script, in its order; returns their lower-case names."""
    hyper = parser.add_argument_group("hyperparameters (defaults from the constants at the top of the script)")
    names = []
    for name, comment in _read_constants(script_path, namespace):
        key = name.lower()
        default = _of_kind(key, namespace[name], f"{Path(script_path).name}: {name}")
        names.append(key)
        if default is None:
            preset_values = {p: spec[key] for p, spec in presets.items() if key in spec}
            if not preset_values:  # None means "the preset's", and no preset gives it.
                kind = KINDS.get(key)
                raise UsageError(f"{Path(script_path).name}: {name} = None at the top of the script: must be "
                                 f"{_KIND_NAMES[kind] if kind else 'a value'} (no preset gives {key})")
            kind = KINDS.get(key) or type(next(iter(preset_values.values())))
            shown = ", ".join(f"{p}: {v}" for p, v in preset_values.items())
            help_text = f"{comment} (default: from --arch; {shown})"
        else:
            kind = type(default)
            help_text = f"{comment} (default: {default!r})" if default == "" else f"{comment} (default: {default})"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            hyper.add_argument(flag(name), dest=key, default=default, help=help_text,
                               action=argparse.BooleanOptionalAction)
        else:
            choices = list(presets) + (["auto"] if auto_preset else []) if key == "arch" and presets else None
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


def _check_hyperparameters(values):
    """Each hyperparameter's own range, and the one rule between two of them (a batch within --limit)."""
    for key in values["hyperparameters"]:
        value = values[key]
        if key in _CHECKS and not isinstance(value, bool):
            check, requirement = _CHECKS[key]
            if not check(value):
                raise UsageError(f"argument {flag(key)}: {requirement}, got {value}")
    if values["limit"] and values["batch_size"] > values["limit"]:
        raise UsageError(f"argument --batch-size: {values['batch_size']} is larger than the "
                         f"{values['limit']} training images of --limit {values['limit']}")
