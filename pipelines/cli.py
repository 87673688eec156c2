"""`pneumoscope pipeline ...` (placeholder registration; filled in by the pipelines work)."""


def add_commands(commands) -> None:
    commands.add_parser("pipeline", help="compile, run locally or submit the Kubeflow pipeline")
