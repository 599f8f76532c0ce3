"""`progprune export`: thin, the work is progprune.export's (loaded when the command runs)."""
from __future__ import annotations

import json

import click


@click.command("export")
@click.argument("artifact", metavar="PRUNED.pt")
@click.option("--format", "fmt", required=True, metavar="onnx|torchscript|hf",
              help="onnx (dynamic batch axis; run it in onnxruntime), torchscript, or hf (a causal LM's "
                   "directory for transformers' from_pretrained)")
@click.option("--output", "--out", "output", required=True, metavar="FILE|DIR",
              help="the file to write (hf: a new directory)")
@click.option("--force", is_flag=True, help="replace FILE if it exists")
@click.option("--trust-factory", is_flag=True,
              help="a py:module:factory model: import and run the factory the artifact names")
def export_command(artifact, fmt, output, force, trust_factory):
    """Write the deployable model of a pruned artifact (pruned.pt, final.pt).

    The file records the input shape, class count, model name, normalisation and progprune
    version (ONNX metadata_props; TorchScript's progprune.json extra file). A causal LM's
    artifact exports as `hf`: a directory that AutoModelForCausalLM.from_pretrained and
    AutoTokenizer load offline."""
    import os

    from progprune.errors import BadInput
    from progprune.export import FORMATS, export_artifact, read_metadata
    from progprune.lm.artifact import export_hf, is_lm_artifact

    lm = os.path.isfile(artifact) and is_lm_artifact(artifact)
    if fmt == "hf" and os.path.isfile(artifact) and not lm:
        raise BadInput(f"{artifact} is an image model's artifact; --format hf exports a causal LM's (task "
                       "causal_lm): use --format onnx or torchscript", field="--format")
    if fmt in FORMATS and lm:
        raise BadInput(f"{artifact} is a causal LM's artifact: export it with --format hf (a directory "
                       "transformers loads)", field="--format")
    if fmt == "hf":
        click.echo(f"wrote {export_hf(artifact, output)} (hf: config.json, weights, tokenizer)")
        return
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}, hf", field="--format")

    path = export_artifact(artifact, fmt, output, force=force, trust_factory=trust_factory)
    meta = read_metadata(path)
    click.echo(f"wrote {path} ({fmt}: {meta['progprune.model']}, {meta['progprune.num_classes']} classes, "
               f"input [N, {', '.join(map(str, json.loads(meta['progprune.input_shape'])))}])")
