"""``difflab samplers``: list the registered samplers and their options."""

from __future__ import annotations

import click

@click.command()
def samplers() -> None:
    """List the samplers and their options."""
    from difflab.samplers import sampler_names, sampler_options

    for name in sampler_names():
        opts = ", ".join(f"{k}={v!r}" for k, v in sampler_options(name).items())
        click.echo(f"{name:16s} {opts}")
