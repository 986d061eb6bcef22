"""`edgelora config ...`."""

from __future__ import annotations


import click



@click.group()
def config():
    """The config file."""


@config.command("show")
def config_show():
    """The values in force, as valid TOML (redirect it into the config file if you like)."""
    from edgelora.config import cache_dir, config_text, data_dir, load_config
    from edgelora.roles.session import default_folders

    cfg = load_config()
    click.echo(f"# {cfg.path} ({'exists' if cfg.path and cfg.path.exists() else 'not created; defaults'})")
    click.echo(f"# data folder: {data_dir()}\n# cache folder: {cache_dir()}")
    click.echo("# roles folders: " + ", ".join(map(str, default_folders(cfg))))
    click.echo(config_text(cfg), nl=False)


@config.command("path")
def config_path_cmd():
    """Print where the config file is (EDGELORA_CONFIG overrides)."""
    from edgelora.config import config_path

    click.echo(config_path())


@config.command("init")
@click.option("--force", is_flag=True, help="Replace an existing config file.")
def config_init(force):
    """Write a commented default config file (refuses to overwrite without --force)."""
    from edgelora.config import config_path, init_config

    click.echo(f"wrote {init_config(config_path(), force=force)}")


@config.command("edit")
def config_edit():
    """Open the config file in $VISUAL or $EDITOR (written with the defaults first if missing), then check it."""
    from edgelora.config import config_path, edit_config

    edit_config(config_path())
    click.echo(f"{config_path()}: valid")
