"""Hydra's Optuna sweeper, resumable: ``hydra/sweeper=worst_case_optuna`` (conf/hydra/sweeper/; the plugin
class Hydra loads is ``hydra_plugins.sdd_worst_case_sweeper.ResumableOptunaSweeper``).

The plugin as shipped (hydra-optuna-sweeper 1.3) runs ``n_trials`` more trials at every start and leaves a
trial that a kill interrupted RUNNING forever. This sweeper, with the study in sqlite under the sweep folder:

- counts the study's finished trials toward ``n_trials`` (started again, a sweep runs only what is left);
- marks a trial left RUNNING by a kill as failed (system attribute ``interrupted``, not counted as finished)
  and enqueues its parameters again, so it is re-run first (its finished stages are reused by hash);
- gives each trial's job the trial's number (``hydra.job.num``, hence its folder ``<sweep dir>/<number>``), so
  a resumed sweep never writes into an earlier trial's folder;
- reseeds a seeded sampler by the number of trials already in the study (a resumed TPE would otherwise
  draw its first random trials again);
- refuses to resume a study started with another search (parameters, fixed overrides or ``search.*``);
- records a job that returns None (``sdd.worst_case``: over the capability bound) as a failed trial, and a job
  that raised as failed too (the sweep stops when more than ``max_failure_rate`` of a batch raised);
- writes the best trial's overrides to ``best_overrides.txt`` (one per line, and the command that reruns it)
  and the plugin's ``optimization_results.yaml``.

Only one sweep process may run a study at a time (a second one would take the first's RUNNING trials for
interrupted ones).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sdd.errors import UserError

log = logging.getLogger(__name__)

BEST_OVERRIDES = "best_overrides.txt"
INTERRUPTED = "interrupted"  # system attribute of a trial a kill left RUNNING
SEARCH_ATTR = "search"  # study user attribute: the search it was started with
ONE_PER_STUDY = ("point.backbone", "point.defense")  # what names the sweep folder: never a searched parameter


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's sweeper with a resumable ``sweep`` (same config); Hydra builds it through
    ``hydra_plugins.sdd_worst_case_sweeper.ResumableOptunaSweeper``."""

    def sweep(self, arguments: list[str]) -> None:
        from sdd.cli import user_errors

        user_errors(self._sweep)(arguments)  # a fixable failure (another search in the folder): one line naming the fix

    def _sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
        for name in fixed:
            distributions.pop(name, None)
        mixed = sorted(set(distributions) & set(ONE_PER_STUDY))
        if mixed:
            raise UserError(
                f"{', '.join(mixed)} cannot be searched: one study is one backbone and defense, in the "
                "sweep folder named after them. Fix: run the command once per value "
                f"({mixed[0]}=<one value>)."
            )
        if not isinstance(self.sampler, optuna.samplers.BaseSampler):  # the grid sampler is a partial until sweep
            raise UserError(
                "hydra/sweeper=worst_case_optuna does not support the grid sampler: use "
                "hydra/sweeper/sampler=tpe or random, or the basic sweeper for a grid."
            )
        directions = self._get_directions()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # the sqlite file lives here
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            directions=directions,
            load_if_exists=True,
        )
        check_same_search(study, distributions, fixed, self.config)
        interrupted = recover_interrupted(study)
        study.sampler = self._reseeded_sampler(len(study.trials)) or study.sampler
        done = finished_trials(study)
        log.info(
            "Study %s in %s: %d trial(s) finished, %d to run (n_trials=%d)%s",
            study.study_name,
            self.storage,
            len(done),
            max(0, self.n_trials - len(done)),
            self.n_trials,
            f"; interrupted trial(s) {interrupted} re-enqueued" if interrupted else "",
        )
        to_go = self.n_trials - len(done)
        while to_go > 0:
            batch = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = self._configure_trials(batch, distributions, fixed)
            returns = self._launch(batch, overrides)
            raised = [tell(study, trial, job) for trial, job in zip(batch, returns)].count("raised")
            if raised / len(returns) > self.max_failure_rate:
                log.error("%d of %d trial(s) raised (max_failure_rate=%g)", raised, len(returns), self.max_failure_rate)
                for job in returns:
                    _ = job.return_value  # re-raises the job's exception with its traceback
            to_go -= len(batch)
        write_best(study, fixed, sweep_dir)

    def _launch(self, trials: Sequence[optuna.trial.Trial], overrides: Sequence[Sequence[str]]) -> list[Any]:
        """Launch the trials as jobs numbered by their trial numbers (consecutive runs launched together)."""
        returns: list[Any] = []
        start = 0
        for index in range(1, len(trials) + 1):
            if index == len(trials) or trials[index].number != trials[index - 1].number + 1:
                returns += self.launcher.launch(list(overrides[start:index]), initial_job_idx=trials[start].number)
                start = index
        self.job_idx = trials[-1].number + 1
        return returns

    def _reseeded_sampler(self, offset: int) -> optuna.samplers.BaseSampler | None:
        """The configured sampler with its seed moved by ``offset`` (None when it has no seed)."""
        sampler_cfg = self.config.hydra.sweeper.get("sampler")
        if sampler_cfg is None or sampler_cfg.get("seed") is None or offset == 0:
            return None
        sampler_cfg = OmegaConf.to_container(sampler_cfg, resolve=True)
        sampler_cfg["seed"] = int(sampler_cfg["seed"]) + offset
        return instantiate(sampler_cfg)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to an end (complete, failed, pruned); one a kill interrupted does not count."""
    return [
        t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.system_attrs.get(INTERRUPTED)
    ]


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Mark each RUNNING trial (left by a kill) failed and interrupted, and enqueue its parameters again."""
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
        with warnings.catch_warnings():  # optuna 2.x calls enqueue_trial experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(dict(trial.params))
        numbers.append(trial.number)
    return numbers


def check_same_search(study: optuna.Study, distributions: dict[str, Any], fixed: dict[str, Any], config: Any) -> None:
    """Record the search on a new study; refuse to resume one that was started with another search."""
    searched = {name: optuna.distributions.distribution_to_json(d) for name, d in sorted(distributions.items())}
    search_node = OmegaConf.to_container(config.search, resolve=True) if config.get("search") is not None else {}
    settings = {k: v for k, v in search_node.items() if f"search.{k}" not in distributions}
    search = json.loads(
        json.dumps(
            {"params": searched, "fixed": {k: str(v) for k, v in sorted(fixed.items())}, "settings": settings},
            default=str,
        )
    )
    recorded = study.user_attrs.get(SEARCH_ATTR)
    if recorded is None:
        study.set_user_attr(SEARCH_ATTR, search)
    elif recorded != search:
        changed = sorted(
            k
            for part in ("params", "fixed", "settings")
            for k in set(recorded.get(part, {})) | set(search[part])
            if recorded.get(part, {}).get(k) != search[part].get(k)
        )
        raise UserError(
            f"The study {study.study_name!r} in {config.hydra.sweep.dir} was started with another search "
            f"(differs in: {', '.join(changed)}). Fix: run the same command to resume it, or give the new search "
            "its own folder (hydra.sweep.dir=...)."
        )


def tell(study: optuna.Study, trial: optuna.trial.Trial, job: Any) -> str:
    """Record a job's outcome on its trial: ``complete``, ``failed`` (None or not finite) or ``raised``."""
    from sdd.worst_case import read_outcome

    try:
        value = job.return_value
    except Exception as error:  # noqa: BLE001 -- any failure of the job is the trial's failure
        log.warning("Trial %d raised: %s: %s", trial.number, type(error).__name__, error)
        study.tell(trial, state=TrialState.FAIL)
        return "raised"
    outcome = read_outcome(Path(str(job.hydra_cfg.hydra.runtime.output_dir))) if job.hydra_cfg else None
    for key in ("harm_metric", "harm", "capability_drop_pct", "reason"):
        if outcome and outcome.get(key) is not None:
            trial.set_user_attr(key, outcome[key])
    if value is None or not math.isfinite(float(value)):
        log.warning("Trial %d failed: %s", trial.number, (outcome or {}).get("reason") or f"objective {value}")
        study.tell(trial, state=TrialState.FAIL)
        return "failed"
    study.tell(trial, values=[float(value)])
    log.info("Trial %d: %g", trial.number, float(value))
    return "complete"


def write_best(study: optuna.Study, fixed: dict[str, Any], sweep_dir: Path) -> Path | None:
    """Write the best trial's overrides (``best_overrides.txt``) and ``optimization_results.yaml``."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        log.warning("No trial of study %s finished within the bound: no best overrides written.", study.study_name)
        return None
    best = study.best_trial
    overrides = [*(f"{k}={v}" for k, v in fixed.items()), *(f"{k}={v}" for k, v in best.params.items())]
    command = "python pipeline.py " + " ".join(shlex.quote(o) for o in overrides)
    attrs = best.user_attrs
    header = [
        f"# Best of {len(complete)} admissible trial(s) (study {study.study_name}, {len(study.trials)} trial(s)): "
        f"trial {best.number}, {attrs.get('harm_metric', 'objective')} = {best.value:g}"
        + (f", capability drop {attrs['capability_drop_pct']:.2f}%" if "capability_drop_pct" in attrs else ""),
        "# Rerun it as one point (its stages are reused):",
        f"#   {command}",
        f"#   python pipeline.py $(grep -v '^#' {sweep_dir / BEST_OVERRIDES})",
    ]
    path = sweep_dir / BEST_OVERRIDES
    path.write_text("\n".join([*header, *overrides]) + "\n")
    OmegaConf.save(
        OmegaConf.create(
            {
                "name": "optuna",
                "best_trial": best.number,
                "best_params": best.params,
                "best_value": best.value,
                "best_overrides": overrides,
            }
        ),
        sweep_dir / "optimization_results.yaml",
    )
    log.info("Best trial %d (%g); its overrides: %s", best.number, best.value, path)
    return path
