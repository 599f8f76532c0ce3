"""progprune: FLOPs-targeted progressive structured pruning, run at scale on Ray."""
__version__ = "0.1.0"

from progprune.errors import ProgpruneError, SpecError  # noqa: E402

__all__ = ["__version__", "ProgpruneError", "SpecError", "load_pruned"]


def load_pruned(path, *, trust_factory: bool = False, factory=None):
    """Load a model that progprune wrote (`pruned.pt`, `final.pt`) as a plain `nn.Module`
    in eval mode: the registry architecture at its pruned widths with the saved weights.

    The file is read with `torch.load(weights_only=True)`, so no code from it runs, and
    the model needs nothing from progprune once loaded::

        import progprune
        model = progprune.load_pruned("out/pruned.pt")
        logits = model(images)  # float batches normalised as in training (the data set mean/std)

    A `py:module:factory` model is rebuilt by your code, which the file names but does not
    hold: pass the callable (`factory=build`, called as `build(num_classes=N)`), or
    `trust_factory=True` to let the name be imported (from the working directory or
    PYTHONPATH) and run. Without either, such a file is refused: loading a file never
    imports code it names unless you opt in.

    A bad file raises `ProgpruneError` with one line saying what is wrong.
    """
    from progprune.artifacts import load_pruned as _load  # torch loads here, not at import

    return _load(path, trust_factory=trust_factory, factory=factory)
