"""Configuration: constants as flags, preset defaults, and one-line refusals of bad input."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dcgan_mnist
import gan_mnist
from conftest import REPO, parse, run_script
from ganlab import configurator, errors


def test_defaults_come_from_the_constants_at_the_top():
    config = parse(gan_mnist)
    assert (config.epochs, config.batch_size, config.lr, config.beta1) == (100, 100, 2e-4, 0.5)
    assert config.latent_dim == 100 and config.dropout == 0.3
    assert config.out.parts[-2:] == ("results", "gan_mnist")


def test_every_constant_is_a_flag_under_the_same_name():
    config = parse(gan_mnist, "--epochs", "3", "--batch-size", "64", "--lr", "1e-4", "--latent-dim", "64",
                   "--seed", "7", "--dropout", "0", "--limit", "640")
    assert (config.epochs, config.batch_size, config.lr, config.latent_dim, config.seed) == (3, 64, 1e-4, 64, 7)
    assert config.dropout == 0.0 and isinstance(config.lr, float)


@pytest.mark.parametrize("module", [gan_mnist, dcgan_mnist])
def test_help_lists_every_constant_with_its_default(module, capsys):
    with pytest.raises(SystemExit) as exit_status:
        parse(module, "--help")
    assert exit_status.value.code == 0
    text = capsys.readouterr().out
    constants = [name for name, value in vars(module).items()
                 if name.isupper() and (value is None or isinstance(value, (int, float, str)))
                 and name not in ("IMAGE_SHAPE",)]
    for name in constants:
        assert "--" + name.lower().replace("_", "-") in text, name
    for flag in ("--out", "--data-dir", "--generate", "--samples-npz"):
        assert flag in text
    epochs_help = " ".join(re.search(r"^  --epochs INT(.*?)\n  --", text, flags=re.S | re.M).group(1).split())
    assert epochs_help.endswith(f"(default: {module.EPOCHS})")  # The constant's own value and comment.


def test_presets_give_their_own_defaults_and_flags_override_them():
    assert (parse(dcgan_mnist).batch_size, parse(dcgan_mnist).latent_dim, parse(dcgan_mnist).lr) == (64, 100, 1e-3)
    config = parse(dcgan_mnist, "--arch", "32")
    assert (config.latent_dim, config.kernel_size, config.batch_size, config.lr) == (200, 4, 64, 2e-4)
    assert parse(dcgan_mnist, "--lr", "2e-4").lr == 2e-4  # Radford's rate for the 28 preset, from the flag.
    assert parse(dcgan_mnist).r1 == 1.0 and parse(dcgan_mnist, "--arch", "64").r1 == 0.0
    assert parse(dcgan_mnist, "--r1", "0").r1 == 0.0  # Radford's recipe has no penalty.
    assert (parse(dcgan_mnist).beta1, parse(dcgan_mnist, "--arch", "32").beta1) == (0.0, 0.5)
    assert parse(dcgan_mnist, "--beta1", "0.5").beta1 == 0.5  # Radford's momentum for the 28 preset, from the flag.
    config = parse(dcgan_mnist, "--arch", "64", "--latent-dim", "32")
    assert (config.latent_dim, config.kernel_size, config.batch_size) == (32, 4, 100)


@pytest.mark.parametrize("module, argv, flag", [
    (gan_mnist, ["--epochs", "0"], "--epochs"),
    (gan_mnist, ["--epochs", "two"], "--epochs"),
    (gan_mnist, ["--epochs", "1.5"], "--epochs"),
    (gan_mnist, ["--batch-size", "-1"], "--batch-size"),
    (gan_mnist, ["--lr", "0"], "--lr"),
    (gan_mnist, ["--lr", "nan"], "--lr"),
    (gan_mnist, ["--beta1", "1"], "--beta1"),
    (dcgan_mnist, ["--beta2", "-0.1"], "--beta2"),
    (gan_mnist, ["--dropout", "1.5"], "--dropout"),
    (gan_mnist, ["--limit", "-5"], "--limit"),
    (gan_mnist, ["--limit", "50"], "--batch-size"),  # Batch 100 is larger than 50 images.
    (gan_mnist, ["--learning-rate", "1e-4"], "--learning-rate"),
    (gan_mnist, ["--generate", "0"], "--generate"),
    (gan_mnist, ["--samples-npz", "s.npz"], "--samples-npz"),
    (gan_mnist, ["--generate", "5", "--samples-npz", "s.png"], "--samples-npz"),
    (dcgan_mnist, ["--arch", "48"], "--arch"),
    (dcgan_mnist, ["--kernel-size", "0"], "--kernel-size"),
    (dcgan_mnist, ["--ema", "1"], "--ema"),
    (dcgan_mnist, ["--loss", "wasserstein"], "--loss"),
    (gan_mnist, ["--loss", "rp"], "--loss"),  # Studied and removed: see results/README.md.
    (dcgan_mnist, ["--lr-decay", "0.5"], "--lr-decay"),
    (gan_mnist, ["--r1", "-1"], "--r1"),
    (dcgan_mnist, ["--g-steps", "0"], "--g-steps"),
    (gan_mnist, ["--seed", "-1"], "--seed"),
    (dcgan_mnist, ["--seed", str(2**32)], "--seed"),
    (gan_mnist, ["--generate", "4", "--seed", "-1"], "--seed"),
    (gan_mnist, ["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
    (dcgan_mnist, ["--checkpoint-minutes", "inf"], "--checkpoint-minutes"),
])
def test_bad_flags_are_refused_in_one_line_naming_the_flag(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(module.main, argv)
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "error:" in error
    assert flag in error


def test_bad_flag_from_the_shell_exits_2_before_any_model_is_built(tmp_path):
    result = run_script("dcgan_mnist.py", "--batch-size", "0", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr == ("dcgan_mnist.py: error: argument --batch-size: must be a positive integer, "
                             "got 0 (see --help)\n")
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_data_is_refused_after_loading(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--data-dir", str(mnist_dir), "--limit", "0", "--batch-size", "70000",
                                        "--out", str(tmp_path / "run")])
    assert exit_status.value.code == 2
    assert "--batch-size: 70000 is larger than the 60000 training images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _edited_script(tmp_path, module, name, value=None):
    """A copy of `module`'s script in tmp_path with the constant `name` set to `value` (its line dropped when
    `value` is None), and the namespace its import would give: as a user's edit of the script's top."""
    lines = []
    for line in Path(module.__file__).read_text().splitlines():
        if re.match(rf"{name} = ", line):
            if value is None:
                continue
            line = f"{name} = {value}  # edited"
        lines.append(line)
    script = tmp_path / Path(module.__file__).name
    script.write_text("\n".join(lines) + "\n")
    namespace = dict(vars(module))
    if value is None:
        namespace.pop(name)
    else:
        namespace[name] = eval(value)
    return script, namespace


def _parse_edited(tmp_path, module, name, value=None, argv=()):
    script, namespace = _edited_script(tmp_path, module, name, value)
    return configurator.parse(str(script), namespace, list(argv), presets=namespace.get("PRESETS"),
                              auto_preset=namespace.get("default_arch"))


@pytest.mark.parametrize("module, name, value, message", [
    (gan_mnist, "LR", '"fast"', "gan_mnist.py: LR = 'fast' at the top of the script: must be a number"),
    (gan_mnist, "LR", None, "gan_mnist.py: the constant LR is missing from the top of the script"),
    (dcgan_mnist, "LR", None, "dcgan_mnist.py: the constant LR is missing from the top of the script"),
    (dcgan_mnist, "BN_MOMENTUM", None, "dcgan_mnist.py: the constant BN_MOMENTUM is missing"),  # The script's own.
    (gan_mnist, "EPOCHS", "20.5", "gan_mnist.py: EPOCHS = 20.5 at the top of the script: must be a whole number"),
    (gan_mnist, "EPOCHS", "0", "gan_mnist.py: EPOCHS = 0 at the top of the script: must be a positive integer"),
    (gan_mnist, "CONDITIONAL", '"yes"', "gan_mnist.py: CONDITIONAL = 'yes' at the top of the script: must be True"),
    (dcgan_mnist, "DATASET", '"imagenet"', "dcgan_mnist.py: DATASET = 'imagenet' at the top of the script: must be "
                                           "mnist, fashion_mnist, cifar10 or folder"),
    (dcgan_mnist, "CLASSES", '"zebra"', "dcgan_mnist.py: CLASSES = 'zebra' at the top of the script:"),
])
def test_an_edited_constant_is_refused_in_one_line_naming_it(tmp_path, module, name, value, message):
    """Issue 41, 5: a TypeError, an AttributeError after TensorFlow had started, or "argument --epochs" before."""
    with pytest.raises(errors.UsageError) as refused:
        _parse_edited(tmp_path, module, name, value)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value), str(refused.value)
    assert "argument --" not in str(refused.value)


def test_an_edited_constant_given_as_a_flag_is_the_flags_and_a_whole_float_is_an_integer(tmp_path):
    values = _parse_edited(tmp_path, gan_mnist, "EPOCHS", "20.0")
    assert values["epochs"] == 20 and type(values["epochs"]) is int
    with pytest.raises(errors.UsageError, match="^argument --epochs: must be a positive integer, got 0"):
        _parse_edited(tmp_path, gan_mnist, "EPOCHS", "20", ["--epochs", "0"])  # The flag the user passed.


def test_a_preset_entry_of_the_wrong_type_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(dcgan_mnist.PRESETS, "28", dict(dcgan_mnist.PRESETS["28"], lr="fast"))
    with pytest.raises(errors.UsageError, match=r"^dcgan_mnist.py: PRESETS\['28'\]\['lr'\] = 'fast' .*must be a number"):
        parse(dcgan_mnist)


@pytest.mark.slow
def test_an_edited_script_run_from_the_shell_exits_2_and_writes_nothing(tmp_path):
    script, _ = _edited_script(tmp_path, gan_mnist, "LR", '"fast"')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "gan_mnist.py: LR = 'fast' at the top of the script: must be a number" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gan_mnist.py"]  # No results/ directory.


# --- The command line answered before TensorFlow loads (issue 40, 6) ------------------------------------------

def _tensorflow_imported(stderr):
    """Whether `python -X importtime`'s report in `stderr` lists TensorFlow among the modules imported."""
    return any(line.startswith("import time:") and line.rstrip().endswith(("| tensorflow", "| keras"))
               for line in stderr.splitlines())


@pytest.mark.parametrize("script, argv, status, expected", [
    ("gan_mnist.py", ["--help"], 0, "usage: gan_mnist.py"),
    ("dcgan_mnist.py", ["--help"], 0, "usage: dcgan_mnist.py [-h] [--arch STR]"),
    ("dcgan_mnist.py", ["--batch-size", "0"], 2,
     "dcgan_mnist.py: error: argument --batch-size: must be a positive integer, got 0 (see --help)"),
    ("gan_mnist.py", ["--epoch", "3"], 2, "gan_mnist.py: error: unrecognized arguments: --epoch 3 (see --help)"),
])
def test_help_and_a_bad_flag_are_answered_without_tensorflow(script, argv, status, expected):
    """Issue 40, 6: `--help` took 7 s, all of it TensorFlow's start; it is answered before TensorFlow is imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", script, *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == status, done.stderr[-2000:]
    assert expected in (done.stdout if status == 0 else done.stderr)
    assert not _tensorflow_imported(done.stderr)
    assert [line for line in done.stderr.splitlines() if not line.startswith("import time:")] == (
        [] if status == 0 else [expected])


@pytest.mark.parametrize("module, argv", [
    (gan_mnist, []), (dcgan_mnist, []), (dcgan_mnist, ["--arch", "64", "--lr", "1e-4"]),
    (gan_mnist, ["--dataset", "cifar10", "--conditional", "--classes", "cat,dog"]),
])
def test_the_script_as_written_parses_as_the_script_run(module, argv, tmp_path):
    """What the early answer parses (the constants read from the source, the preset's function defined alone) is
    what the run parses from the module itself, field for field."""
    arguments = configurator._as_written(module.__file__)
    early = configurator.parse(module.__file__, argv=argv + ["--out", str(tmp_path)], **arguments)
    full = configurator.parse(module.__file__, vars(module), argv + ["--out", str(tmp_path)],
                              presets=getattr(module, "PRESETS", None), auto_preset=getattr(module, "default_arch", None))
    assert early.pop("multiply_adds") is None and full.pop("multiply_adds") is not None
    assert early == full


@pytest.mark.parametrize("edit", [
    ("LR = 2e-4", "LR = 2e-4 * 2"),  # Computed.
    ("EPOCHS = 100", "EPOCHS: int = 100"),  # Bound another way.
    ("SEED = 0", "SEED = 0\nfor SEED in (1, 2):\n    pass"),
])
def test_a_script_read_only_by_running_it_is_left_to_the_full_run(edit, tmp_path):
    """A constant that only running the script gives is not guessed at: the early answer stands aside."""
    source = Path(gan_mnist.__file__).read_text()
    assert edit[0] in source
    script = tmp_path / "gan_mnist.py"
    script.write_text(source.replace(edit[0], edit[1], 1))
    assert configurator._as_written(script) is None
    configurator.answer_early(script, ["--epochs", "0"])  # Returns: the full run says it.


def test_a_good_command_line_goes_on_to_the_run_in_silence(capsys):
    configurator.answer_early(Path(dcgan_mnist.__file__), ["--epochs", "2", "--limit", "640"])
    assert capsys.readouterr() == ("", "")


def test_an_edited_copy_of_a_script_elsewhere_is_answered_without_tensorflow(tmp_path):
    script = tmp_path / "gan_mnist.py"
    script.write_text(Path(gan_mnist.__file__).read_text().replace("EPOCHS = 100", "EPOCHS = 0", 1))
    done = subprocess.run([sys.executable, "-X", "importtime", str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and said == [
        "gan_mnist.py: error: gan_mnist.py: EPOCHS = 0 at the top of the script: must be a positive integer, got 0 "
        "(see --help)"]
    assert not _tensorflow_imported(done.stderr) and not (tmp_path / "results").exists()


def test_a_script_that_trains_nothing_is_not_read_as_one():
    """A tool run as the main script (it calls no `configurator.resolve`) keeps its own command line."""
    assert configurator._as_written(REPO / "tools" / "bad_inputs.py") is None
    assert configurator._as_written(REPO / "results" / "extra_averages.py") is None
