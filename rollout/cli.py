"""``pneumoscope rollout canary|status|analyze|promote|rollback|history|serve-local`` (plugged into ``model.cli``).

Every refusal or failure is one line and a non-zero exit (``model.cli`` prints CommandError that way).
Progress goes to stderr; the result to stdout (``--json`` for machines).
"""

from __future__ import annotations

import json


def add_commands(commands) -> None:
    rollout = commands.add_parser(
        "rollout", help="canary rollouts of model versions (cluster or --local)",
        description="Roll a registered model version out as a canary, look at it, compare it with the stable "
                    "version in Prometheus, then promote it or roll it back. Against the InferenceService of "
                    "the current kube context, or with --local against `pneumoscope serve --traffic-split`.")
    actions = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")

    def common(p):
        from model.settings_cli import add_settings_flags
        from rollout.settings import RolloutSettings

        p.add_argument("--local", action="store_true", help="the local canary of `pneumoscope serve` (nginx)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        add_settings_flags(p.add_argument_group(
            "rollout settings", "each also read from its environment variable; a flag wins over it"), RolloutSettings)
        p.set_defaults(func=cmd_rollout)

    p = actions.add_parser("canary", help="send a share of the traffic to a new version")
    p.add_argument("--version", required=True, help="registered version number, e.g. 7")
    p.add_argument("--percent", type=int, required=True, help="share of the traffic for the new version (1-99)")
    p.add_argument("--force", action="store_true", help="roll out a version that did not pass its evaluation gate")
    common(p)
    common(actions.add_parser("status", help="versions, traffic split, readiness and live health of each side"))
    common(actions.add_parser("analyze", help="canary vs stable from Prometheus, with a verdict"))
    p = actions.add_parser("promote", help="the canary takes 100 %% and becomes the MLflow champion")
    p.add_argument("--if-healthy", action="store_true", help="refuse unless `rollout analyze` says healthy")
    common(p)
    common(actions.add_parser("rollback", help="back to the stable version; the canary is removed"))
    common(actions.add_parser("history", help="past rollouts: who, when, from which version to which, outcome"))

    from rollout.local_canary import add_serve_local  # the local runner: nginx + serving stacks

    add_serve_local(actions)


def backend_for(args, settings):
    if args.local:
        from rollout.local import LocalBackend

        return LocalBackend(settings)
    from rollout.cluster import ClusterBackend

    return ClusterBackend(settings)


def verdict_for(settings, registry, current: dict):
    from rollout import inferenceservice as isvc_
    from rollout.analysis import analyze
    from rollout.errors import RolloutError

    canary, _ = isvc_.canary(current)
    stable = isvc_.stable_version(current, settings.model_name)
    if canary is None:
        raise RolloutError("no canary is running: nothing to analyze")
    references = {v: registry.reference(v) for v in (stable, canary)}
    return analyze(settings, stable, canary, references)


def cmd_rollout(args) -> int:
    from model.cli import CommandError
    from model.settings_cli import settings_from_args
    from rollout.controller import Rollout, check_percent
    from rollout.errors import RolloutError
    from rollout.settings import RolloutSettings
    from rollout.versions import Registry

    settings = settings_from_args(RolloutSettings, args)
    try:
        if args.rollout_command == "canary":
            check_percent(args.percent)  # before anything is contacted
        backend = backend_for(args, settings)
        backend.read()  # an unreachable cluster or no local canary: said before anything else is contacted
        registry = Registry(settings.model_name, settings.mlflow_tracking_uri)
        rollout = Rollout(backend, registry, settings.model_name)
        command = args.rollout_command
        if command == "canary":
            result = rollout.canary(args.version, args.percent, args.force)
        elif command == "promote":
            analyze = (lambda: verdict_for(settings, registry, backend.read())) if args.if_healthy else None
            result = rollout.promote(analyze)
        elif command == "rollback":
            result = rollout.rollback()
        elif command == "analyze":
            verdict = verdict_for(settings, registry, backend.read())
            print(json.dumps(verdict.to_dict()) if args.json else "\n".join(verdict.lines()))
            return 0 if verdict.healthy else 3
        elif command == "status":
            return _print_status(rollout.status(), settings, registry, backend, args.json)
        else:
            return _print_history(rollout.history(), args.json)
    except RolloutError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"result": result}) if args.json else result)
    return 0


def _print_status(status: dict, settings, registry, backend, as_json: bool) -> int:
    from rollout.errors import RolloutError

    status["health"] = {}
    if status["stable_version"]:
        from rollout.analysis import Prometheus, measure

        try:
            prometheus = Prometheus(settings.prometheus_url, timeout_s=5)
            for role, version in (("stable", status["stable_version"]), ("canary", status["canary_version"])):
                if version:
                    side = measure(prometheus, version, "5m")
                    status["health"][role] = {"version": version, "requests_5m": round(side.requests),
                                              "error_ratio": round(side.error_ratio, 4),
                                              "p99_seconds": None if side.p99 is None else round(side.p99, 3),
                                              "pneumonia_share": None if side.share is None else round(side.share, 3)}
        except RolloutError as exc:
            status["health"] = {"unavailable": str(exc)}
    if as_json:
        print(json.dumps(status))
        return 0
    canary = (f"canary version {status['canary_version']} at {status['canary_percent']} %"
              if status["canary_version"] else "no canary")
    print(f"{status['where']}: stable version {status['stable_version']}, {canary}; "
          f"MLflow champion: {status['champion']}; Ready: {status['ready']}")
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in status["conditions"].items()))
    for component, targets in status["traffic"].items():
        shown = ", ".join(f"{t['revision']} {t['percent']}%{' (latest)' if t['latest'] else ''}" for t in targets)
        print(f"traffic {component}: {shown or 'none reported'}")
    if status["pending"]:
        print(f"UNFINISHED: {status['pending']['action']} of version {status['pending']['version']} "
              "(the next rollout command finishes it)")
    if "unavailable" in status["health"]:
        print(f"live health: {status['health']['unavailable']}")
    for role, h in status["health"].items():
        if role != "unavailable":
            p99 = "n/a" if h["p99_seconds"] is None else f"{h['p99_seconds']} s"
            print(f"live {role} (version {h['version']}, 5m): {h['requests_5m']} requests, 5xx ratio "
                  f"{h['error_ratio']}, p99 {p99}, PNEUMONIA share {h['pneumonia_share']}")
    return 0


def _print_history(entries: list[dict], as_json: bool) -> int:
    if as_json:
        print(json.dumps(entries))
        return 0
    if not entries:
        print("no rollouts recorded")
    for e in entries:
        extra = f" at {e['percent']} %" if e.get("action") == "canary" else ""
        print(f"{e['time']}  {e['user']}  {e['action']}{extra}  {e['from']} -> {e['to']}  {e['outcome']}")
    return 0
