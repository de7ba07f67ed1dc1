"""The ``difflab`` command line: ``difflab train``, ``difflab sample``, ... (``python -m difflab`` is the same).

One module per command; :class:`LazyGroup` imports a command's module only when that command runs
(or its own ``--help`` is asked), so ``difflab --help`` imports neither torch nor accelerate. The
short help of each command is listed in :data:`COMMANDS` for the same reason (a test keeps it equal
to the command's own). Every bad input ends in one line ``error: ...`` on stderr and exit status 2,
without a traceback.
"""

from __future__ import annotations

import importlib
import sys
import click

from difflab.errors import UserError

# command name -> ("module:function" under difflab.cli, short help shown by `difflab --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo:demo", "Train a small text-to-image model on the built-in shapes and draw a grid for a few prompts."),
    "ema": ("ema:ema_command", "Rebuild RUN_DIR's model with any EMA length from its post-hoc EMA snapshots (Karras et al. 2024)."),
    "eval": ("eval:eval_command", "Score a model (sampled at one or more step counts) or a folder of images: FID, IS, PR, NLL, ..."),
    "img2img": ("edit:img2img_command", "Redraw a picture with a trained model: SDEdit image-to-image (Meng et al. 2022)."),
    "inpaint": ("edit:inpaint_command", "Fill the white part of a mask in a picture with a trained model (RePaint or replacement)."),
    "outpaint": ("edit:outpaint_command", "Extend a picture by a border that a trained model fills (outpainting)."),
    "plot-log": ("plot_log:plot_log_command", "Plot RUN_DIR/log.jsonl: the smoothed training loss and, if logged, the prompt adherence against steps."),
    "sample": ("sample:sample", "Sample images from a trained model into a PNG grid."),
    "samplers": ("samplers:samplers", "List the samplers and their options."),
    "train": ("train:train", "Train a diffusion model; Ctrl-C saves a checkpoint first."),
    "train-autoencoder": ("train_autoencoder:train_autoencoder_command", "Train a KL autoencoder (Rombach et al. 2022) for latent diffusion."),
    "train-cascade": ("train_cascade:train_cascade_command", "Train an Imagen-like cascade: a base model, then super-resolution stages, into one folder."),
    "train-classifier": ("train_classifier:train_classifier_cmd", "Train a noise-aware classifier p(y | x_t, t) for classifier guidance."),
    "upscale": ("edit:upscale_command", "Upscale a picture with a super-resolution model (SR3)."),
}


def load_command(name: str) -> click.Command:
    """Import the module of command ``name`` and return its click command."""
    module, attr = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use (``get_command``); listing them imports nothing."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            return load_command(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's own listing (same width and truncation), with the short helps of :data:`COMMANDS`."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit) if name in COMMANDS
                 else self.commands[name].get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="difflab")
def cli() -> None:
    """difflab: train, sample and measure diffusion models."""


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is the trainer's TrainingInterrupted (only possible once difflab.training is imported)."""
    trainer = sys.modules.get("difflab.training.trainer")
    return trainer is not None and isinstance(err, trainer.TrainingInterrupted)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="difflab", standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:
        if not _interrupted(err):
            raise
        click.echo(f"stopped: {err}", err=True)
        sys.exit(130)


__all__ = ["COMMANDS", "LazyGroup", "cli", "load_command", "main"]

