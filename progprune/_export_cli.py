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
    from progprune.export import export_artifact, read_metadata

    if fmt == "hf":
        from progprune.lm.artifact import export_hf

        click.echo(f"wrote {export_hf(artifact, output)} (hf: config.json, weights, tokenizer)")
        return

    path = export_artifact(artifact, fmt, output, force=force, trust_factory=trust_factory)
    meta = read_metadata(path)
    click.echo(f"wrote {path} ({fmt}: {meta['progprune.model']}, {meta['progprune.num_classes']} classes, "
               f"input [N, {', '.join(map(str, json.loads(meta['progprune.input_shape'])))}])")
