"""`pneumoscope serve` / `pneumoscope predict` (placeholder registration; filled in by the serving work)."""


def add_commands(commands) -> None:
    commands.add_parser("serve", help="serve a model locally (transformer + predictor)")
