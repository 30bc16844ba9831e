"""The README's promises: every flag it names exists, every command it quotes parses, every file exists."""

import ast
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

import dcgan_mnist
import gan_mnist
import utils
from conftest import REPO, parse

README = (REPO / "README.md").read_text()
SCRIPTS = {"gan_mnist.py": gan_mnist, "dcgan_mnist.py": dcgan_mnist}


def help_text(module, capsys):
    with pytest.raises(SystemExit):
        parse(module, "--help")
    return capsys.readouterr().out


def test_every_flag_the_readme_names_is_in_a_scripts_help(capsys):
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", README)) - {"--logdir"}  # tensorboard's own
    known = help_text(gan_mnist, capsys) + help_text(dcgan_mnist, capsys)
    missing = sorted(flag for flag in flags if flag not in known)
    assert not missing, f"README names flags that no script has: {missing}"


def test_every_quoted_command_parses(capsys, tmp_path, mnist_dir):
    commands = re.findall(r"^python (\S+\.py)(.*?)(?:\s+#.*)?$", README, flags=re.MULTILINE)
    assert {script for script, _ in commands} == set(SCRIPTS)
    images, labels = utils.load_mnist("train", mnist_dir)
    for script, arguments in commands:
        argv = shlex.split(arguments)
        if "--dataset" in argv and argv[argv.index("--dataset") + 1] == "folder":  # Its pictures, here MNIST's,
            pictures = tmp_path / Path(argv[argv.index("--data-dir") + 1]).name  # in subfolders named as its
            names = argv[argv.index("--classes") + 1].split(",") if "--classes" in argv else ["a", "b"]  # classes.
            for index, name in enumerate(names * 2):
                (pictures / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index]).save(pictures / name / f"{index}.png")
            argv[argv.index("--data-dir") + 1] = str(pictures)
        if "--help" not in argv:
            parse(SCRIPTS[script], *argv)


def test_every_file_the_readme_names_exists_and_every_module_is_named():
    named = set(re.findall(r"(?<![\w./-])([\w/-]+\.(?:py|txt))\b", README))
    assert {"gan_mnist.py", "dcgan_mnist.py", "utils.py", "requirements.txt"} <= named
    missing = sorted(name for name in named if not (REPO / name).is_file())
    assert not missing, f"README names files that do not exist: {missing}"
    unnamed = sorted(path.name for path in REPO.glob("*.py") if path.name not in named)
    assert not unnamed, f"modules the README does not name: {unnamed}"
    assert "`ganlab/`" in README


def test_every_folder_of_the_package_maps_its_modules_in_its_docstring():
    for init in sorted((REPO / "ganlab").rglob("__init__.py")):
        map_text = ast.get_docstring(ast.parse(init.read_text())) or ""
        parts = [p.name for p in init.parent.glob("*.py") if p.name != "__init__.py"]
        parts += [f"{p.name}/" for p in init.parent.iterdir() if (p / "__init__.py").is_file()]
        unnamed = sorted(part for part in parts if part not in map_text)
        assert not unnamed, f"{init.relative_to(REPO)}: its docstring does not name {unnamed}"


def test_every_picture_and_file_the_readme_links_exists_and_the_showcase_opens_it():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    missing = [link for link in local if not (REPO / link).is_file()]
    assert not missing, f"README links files that do not exist: {missing}"
    # The README opens with pictures: the first section after the title shows the showcase images.
    results = README.split("## Results", 1)[1].split("\n## ", 1)[0]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", results)
    assert {"results/showcase/real_samples.png", "results/showcase/dcgan_progress.gif"} <= set(images)
    import imageio.v3 as iio
    frames = iio.imread(REPO / "results/showcase/dcgan_progress.gif", index=None)
    assert frames.shape[0] == 20 and frames.std() > 10  # One frame per epoch of the 20-epoch run, not blank.
    assert README.index("## Results") < README.index("## Run it")


@pytest.mark.parametrize("row, module, argv", [
    ("`gan_mnist.py`", gan_mnist, []),
    ("`dcgan_mnist.py` (`--arch 28`, default)", dcgan_mnist, ["--arch", "28"]),
    ("`dcgan_mnist.py --arch 32`", dcgan_mnist, ["--arch", "32"]),
    ("`dcgan_mnist.py --arch 64`", dcgan_mnist, ["--arch", "64"]),
])
def test_the_parameter_counts_the_readme_gives_are_the_models(row, module, argv):
    line = next(line for line in README.splitlines() if line.startswith(f"| {row} |"))
    quoted = [int(count.replace(",", "")) for count in re.findall(r"[\d,]{5,}", line.split("|")[2])]
    config = parse(module, *argv)
    models = module.build_generator(config), module.build_discriminator(config)
    assert quoted == [model.count_params() for model in models]
