"""What a finished `leantrain tune` study leaves: tune.json (every trial), best.yaml (a config
`leantrain train --config best.yaml` runs), plots as PNG, and a ranked table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_text
from ..errors import one_line
from .space import trial_config
from .study import StudySpec, _optuna

log = logging.getLogger(__name__)

BEST_NAME, REPORT_NAME = "best.yaml", "tune.json"


def _trial_record(trial) -> dict[str, Any]:
    return {"number": trial.number, "state": trial.state.name.lower(),
            "values": trial.values, "params": trial.params,
            "seconds": trial.user_attrs.get("seconds"), **{
                k: v for k, v in trial.user_attrs.items() if k != "seconds"}}


def best_trials(study) -> list:
    """The best trial, or for two objectives the Pareto front sorted by the first."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    first = study.directions[0].name.lower()
    return sorted(study.best_trials, key=lambda t: t.values[0], reverse=first == "maximize")


def _plots(study, out: Path) -> dict[str, str]:
    """Optimisation history, parameter importances, the Pareto front (two objectives): each
    saved when the study has what it needs, else the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = _optuna()
    vis = optuna.visualization.matplotlib
    two = len(study.directions) > 1
    names = study.user_attrs.get("objective_names", ["value"])
    made: dict[str, str] = {}
    wanted = {"history.png": lambda: vis.plot_optimization_history(
                  study, target=(lambda t: t.values[0]) if two else None,
                  target_name=names[0]),
              "importances.png": lambda: vis.plot_param_importances(
                  study, target=(lambda t: t.values[0]) if two else None,
                  target_name=names[0])}
    if two:
        wanted["pareto.png"] = lambda: vis.plot_pareto_front(study, target_names=names)
    for name, draw in wanted.items():
        try:
            axes = draw()
        except Exception as exc:  # too few finished trials, a single value everywhere
            made[name] = f"not drawn: {one_line(exc)}"
            plt.close("all")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        made[name] = "saved"
    return made


def write_report(study, spec: StudySpec, workers: list[dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """Write tune.json, best.yaml and the plots into spec.out; return the report."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    pruned = [t for t in trials if t.state.name == "PRUNED" and "cut" not in t.user_attrs]
    best = best_trials(study)
    report: dict[str, Any] = {
        "study": spec.name, "storage": spec.storage, "objective": spec.objective.kind,
        "objective_names": spec.objective.names, "directions": spec.objective.directions,
        "target": "".join(f"{v:g}" if isinstance(v, float) else v
                          for v in spec.objective.target) if spec.objective.target else None,
        "space": {k: p.describe() for k, p in spec.space.items()}, "fixed": spec.fixed,
        "planned_trials": spec.trials, "budget_s": spec.budget_s,
        "counts": {s.lower(): states.count(s) for s in sorted(set(states))},
        "pruning": {"pruner": spec.pruner, "pruned": len(pruned),
                    "seconds_saved_estimate": sum(t.user_attrs.get("seconds_saved_estimate", 0)
                                                  for t in pruned)},
        "best": [t.number for t in best], "workers": workers or [],
        "trials": [_trial_record(t) for t in trials],
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    if best:
        values = trial_config(spec.base, {**spec.fixed, **best[0].params}).to_dict()
        if values.get("model"):  # the user's model: no recipe is involved
            del values["recipe"]
        header = (f"# leantrain tune: trial {best[0].number} of study {spec.name} "
                  f"({spec.objective.kind}); run it with leantrain train --config {BEST_NAME}\n")
        atomic_write_text(spec.out / BEST_NAME,
                          header + yaml.safe_dump(values, sort_keys=False))
        report["best_config"] = str(spec.out / BEST_NAME)
    study.set_user_attr("objective_names", spec.objective.names)
    report["plots"] = _plots(study, spec.out)
    atomic_write_text(spec.out / REPORT_NAME, json.dumps(report, indent=2, default=str))
    return report


def format_report(report: dict[str, Any], rows: int = 10) -> str:
    """The finished trials ranked best first, then the counts and what pruning saved."""
    from ..measure.report import table

    names = report["objective_names"]
    finished = [t for t in report["trials"] if t["state"] == "complete"]
    maximize = report["directions"][0] == "maximize"
    finished.sort(key=lambda t: t["values"][0], reverse=maximize)
    lines = []
    for t in finished[:rows]:
        values = "  ".join(f"{n} {v:.4g}" for n, v in zip(names, t["values"], strict=True))
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in t["params"].items())
        lines.append((f"trial {t['number']}", f"{values}   {params}"))
    title = f"leantrain tune: {report['objective']}" + (
        f" {report['target']}" if report["target"] else "") + f", study {report['study']}"
    text = table(lines, title) if lines else f"{title}\nno trial finished"
    counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items())
    pruning = report["pruning"]
    text += f"\ntrials: {counts or 'none: the budget ended before the first trial could start'}"
    if pruning["pruned"]:
        text += (f"; the {pruning['pruner']} pruner stopped {pruning['pruned']}, saving about "
                 f"{pruning['seconds_saved_estimate']:.0f} s of their planned epochs")
    if report.get("best_config"):
        best = next(t for t in report["trials"] if t["number"] == report["best"][0])
        missed = report["objective"] == "time-to-target" and \
            best.get("time_to_target_seconds") is None
        text += f"\nbest config: {report['best_config']}" + (
            " (no trial met the target: this is the closest)" if missed else "")
    return text
