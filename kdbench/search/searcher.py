"""What proposes a search's trials: the study's space as Optuna's define-by-run space, its sampler, and the searcher
that tells Optuna a trial ASHA stopped as pruned (never as a full result); a grid's fixed trials."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from ray.tune.search.optuna import OptunaSearch

from ..metrics import mode
from ..study import Study
from ..trial import resolve_trial, trial_config_id

__all__ = ["grid_configs", "Space", "make_sampler", "FidelityAwareOptuna", "make_searcher", "searcher_of"]


def grid_configs(study: Study) -> list[dict]:
    return [{"point": i, "method": m, "seed": s, "stage": "grid", **dict(values)}
            for i, (m, s, values) in enumerate(study.grid.points)]


class Space:
    """Optuna define-by-run space: the method (if searched) first, then the parameters that apply to it.

    A class, not a closure: Ray pickles the searcher with its experiment state.
    """

    def __init__(self, study: Study):
        self.study = study

    def __call__(self, trial):
        study, method = self.study, self.study.method
        for p in study.space:
            if p.name == "method":
                method = trial.suggest_categorical("method", list(p.choices))
        for p in study.space:
            if p.name == "method" or (p.when and method not in p.when):
                continue
            if p.type == "categorical":
                trial.suggest_categorical(p.name, list(p.choices))
            elif p.type == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high))
            else:
                trial.suggest_float(p.name, p.low, p.high, log=p.type == "loguniform")
        return {"method": method, "seed": study.seed}


def make_sampler(study: Study, earlier: int = 0):
    """The study's sampler: TPE (Optuna's defaults: on two objectives independent, with the constant liar), NSGA-II, a
    Gaussian process (GPSampler: log expected hypervolume improvement on two objectives), scrambled Sobol points
    (QMC) or random. ``earlier``: trials a previous run of the folder already made; a resumed run's sampler is
    seeded past them, or its random start-up proposals would repeat the first run's."""
    seed, name = study.seed + earlier, study.search.sampler
    with warnings.catch_warnings():  # GPSampler and QMCSampler are marked experimental: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, study.search.samples // 4)))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if name == "qmc":
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                              warn_independent_sampling=False, warn_asynchronous_seeding=False)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)


class FidelityAwareOptuna(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped before ``max_epochs`` as PRUNED, a failed one as FAIL.

    Ray hands a trial stopped by ASHA to the searcher as complete with its truncated result; a
    low-fidelity point must not steer the sampler or enter Optuna's Pareto set.
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if isinstance(self._metric, list) and self._ot_study is not None:  # optuna-dashboard shows these names
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(self._metric))

    def suggest(self, trial_id):
        with warnings.catch_warnings():  # Ray times the define-by-run space, which a model-based sampler runs in
            warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space`")
            return super().suggest(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result is not None and result.get("failure"):
            return super().on_trial_complete(trial_id, None, error=True)
        if result is not None and result.get("epoch", 0) < self.max_epochs:
            result = None  # -> PRUNED
        return super().on_trial_complete(trial_id, result, error)


def make_searcher(study: Study, out: Path, finished: set = frozenset()) -> FidelityAwareOptuna:
    """The searcher, on the folder's optuna.db. ``finished``: the (config_id, seed) of trials.csv's rows."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    earlier = 0
    # Trials an interrupted run left RUNNING (or enqueued and never started) will never report: mark them
    # failed, and ask for the same parameters first, so that they run again (from their checkpoints)
    # instead of new proposals -- unless trials.csv already holds them (a kill can land between kdbench
    # writing a trial's row and Optuna recording it).
    if study.name in optuna.get_all_study_names(storage):
        study_id = storage.get_study_id_from_name(study.name)
        pending = storage.get_all_trials(study_id, deepcopy=False,
                                         states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
        again, asked = optuna.load_study(study_name=study.name, storage=storage), []
        earlier = len(storage.get_all_trials(study_id, deepcopy=False))
        for t in pending:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            if not t.params:  # killed between Optuna's ask and its suggestions: nothing to repeat
                continue
            config = {"method": t.params.get("method", study.method), **t.params}
            method, recipe, seed = resolve_trial(study, config)
            if (trial_config_id(study, method, recipe), seed) not in finished and t.params not in asked:
                asked.append(t.params)
                again.enqueue_trial(t.params)
    return searcher_of(study, make_sampler(study, earlier), storage)


def searcher_of(study: Study, sampler, storage=None) -> FidelityAwareOptuna:
    """The searcher on the study's space, objectives and ``sampler`` (Optuna's in-memory storage where
    ``storage`` is None: the replay's)."""
    metrics = [f"val_{o}" for o in study.objectives]
    modes = [mode(o) for o in study.objectives]
    # metric/mode go to the searcher only: a TuneConfig metric would silently collapse it to one objective.
    return FidelityAwareOptuna(space=Space(study), metric=metrics, mode=modes, sampler=sampler,
                               study_name=study.name, storage=storage, max_epochs=study.max_epochs)
