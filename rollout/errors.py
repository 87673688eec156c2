"""The one exception of a refused or failed rollout step: its message is the one line the user sees."""


class RolloutError(Exception):
    """A refusal or a failure, worded for the user (what and why; for partial states, what to run next)."""
