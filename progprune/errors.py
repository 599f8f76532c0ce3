"""The project's error types. The CLI maps each to one clean line and an exit code."""


class ProgpruneError(Exception):
    """Bad user input (spec, flag, file). The CLI prints it on one line and exits 2."""

    exit_code = 2


class SpecError(ProgpruneError):
    """A sweep spec with one or more problems, each as 'field.path: what to change'."""

    def __init__(self, problems, source=None):
        self.problems = list(problems) if not isinstance(problems, str) else [problems]
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(self.problems))
