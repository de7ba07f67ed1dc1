"""``difflab --help`` lists every command without importing torch or accelerate (the commands load lazily)."""

import subprocess
import sys

import click

from difflab.cli import COMMANDS, cli, load_command

PROBE = """
import sys
from difflab.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "accelerate", "numpy") if m in sys.modules))
"""


def test_help_imports_neither_torch_nor_accelerate():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60).stdout
    help_text, heavy = out.rsplit("\n", 2)[0], out.strip().splitlines()[-1]
    assert heavy == "[]", f"difflab --help imported {heavy}"
    for name in COMMANDS:
        assert f"  {name} " in help_text


def test_listed_short_help_is_each_commands_own():
    for name, (_, short) in COMMANDS.items():
        command = load_command(name)
        assert isinstance(command, click.Command) and command.name == name
        first = " ".join((command.short_help or command.help or "").split("\n\n")[0].split())
        assert first == short, name
    assert cli.get_command(click.Context(cli), "train").name == "train"


def test_import_difflab_is_light_and_exports_the_pipelines():
    probe = "import sys, difflab; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip() == "False"
    from difflab import DiffusionPipeline, Text2ImagePipeline
    from difflab.pipelines.diffusion import DiffusionPipeline as defined
    from difflab.pipelines.text2image import Text2ImagePipeline as defined_t2i

    assert DiffusionPipeline is defined and Text2ImagePipeline is defined_t2i
