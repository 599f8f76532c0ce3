"""The click command; the CLI group adds it with `cli.add_command(report_command)`."""
from __future__ import annotations

import sys

import click



@click.command("report")
@click.argument("results")
@click.option("--output", "--out", "out_dir", metavar="DIR", default=None,
              help="Report directory (default: <dir of results.parquet>/report; ./report for "
                   "s3:// and gs:// results).")
@click.option("--format", "fmt", type=click.Choice(["md", "html"]), default="md",
              show_default=True, help="html also writes a self-contained report.html.")
def report_command(results: str, out_dir: str | None, fmt: str) -> None:
    """Tables, plots and a Markdown/HTML report from RESULTS: a results.parquet file, a
    sweep output directory, or a file://, s3:// or gs:// URI."""
    from rich.console import Console

    from progprune.report import build_report

    # piped output (CI logs, files) gets wide tables rather than rich's 80-column default
    console = Console(width=None if sys.stdout.isatty() else 200)
    out = build_report(results, out_dir=out_dir, fmt=fmt, console=console)  # errors: cli._Cli
    click.echo(f"report: {out['report']}")
