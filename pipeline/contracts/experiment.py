"""What a site accepts as an experiment from the coordinator: data, never code.

The experiment travels as JSON (:func:`experiment_yaml`). Before a
site builds anything from it, :func:`check_experiment` requires that

* its top-level sections are the experiment's own (``seed``, ``model``, ``trainer``, ``data``,
  ``federation``, ``privacy``, ``governance``);
* ``model.net`` and ``model.optimizer`` name components on the allow-list of
  :mod:`models.registry`, with options of the right types; no ``_target_`` (nor any other
  Hydra key such as ``_args_``, ``_partial_``, ``_recursive_``) appears anywhere else;
* ``trainer`` holds only the Lightning options listed in :data:`TRAINER_OPTIONS`, and
  ``data.augment`` only the augmentation options;
* every other value is a number, a string, a boolean, null, or a list or mapping of them, and no
  string holds an OmegaConf interpolation (``${...}``: resolvers could read the site's
  environment or files).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from models.registry import NETWORKS, OPTIMIZERS, ForbiddenComponent, checked
from pipeline.contracts.messages import CONFIG_KEY

# ``governance`` is the simulation operator's approval policy; a deployed site ignores it.
SECTIONS = ("seed", "model", "trainer", "data", "federation", "privacy", "governance")
MODEL_OPTIONS = {"net", "optimizer", "weights_path", "weights_strict", "class_balance", "freeze"}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64")
TRAINER_OPTIONS: dict[str, tuple[type, ...]] = {
    "accelerator": (str,),
    "devices": (int, str),
    "precision": (str, int),
    "deterministic": (bool, str),
    "benchmark": (bool,),
    "log_every_n_steps": (int,),
    "enable_progress_bar": (bool,),
    "enable_model_summary": (bool,),
    "num_sanity_val_steps": (int,),
    "gradient_clip_val": (int, float),
    "max_epochs": (int,),
}
AUGMENT_OPTIONS = ("rotate_degrees", "translate_fraction", "scale_fraction", "prob")
SCALARS = (str, int, float, bool, type(None))


class InvalidExperiment(ForbiddenComponent):
    """The received experiment holds something a site does not build or accept."""


def _check_plain(value: Any, where: str) -> None:
    """Numbers, strings, booleans and nulls, in lists and mappings; no Hydra keys, no ``${``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_"):
                raise InvalidExperiment(
                    f"{where}.{key}: Hydra keys such as _target_ are only "
                    "accepted in model.net and model.optimizer"
                )
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, SCALARS):
        raise InvalidExperiment(f"{where}: a {type(value).__name__} is not a config value")
    elif isinstance(value, str) and "${" in value:
        raise InvalidExperiment(f"{where}={value!r}: interpolations are not accepted")


def _check_trainer(trainer: Any) -> None:
    if not isinstance(trainer, Mapping):
        raise InvalidExperiment("trainer must be a mapping")
    for key, value in trainer.items():
        if key not in TRAINER_OPTIONS:
            raise InvalidExperiment(
                f"trainer.{key} is not an accepted Lightning option (accepted: {', '.join(TRAINER_OPTIONS)})"
            )
        if value is not None and (
            not isinstance(value, TRAINER_OPTIONS[key])
            or (isinstance(value, bool) and bool not in TRAINER_OPTIONS[key])
        ):
            raise InvalidExperiment(f"trainer.{key}={value!r} has the wrong type")
    if trainer.get("accelerator") not in (None, *ACCELERATORS):
        raise InvalidExperiment(f"trainer.accelerator must be one of {ACCELERATORS}")
    if trainer.get("precision") is not None and str(trainer["precision"]) not in PRECISIONS:
        raise InvalidExperiment(f"trainer.precision must be one of {PRECISIONS}")


def check_experiment(experiment: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidExperiment` (naming the key) unless ``experiment`` is acceptable."""
    if not isinstance(experiment, Mapping):
        raise InvalidExperiment("the experiment must be a mapping")
    unknown = sorted(set(experiment) - set(SECTIONS))
    if unknown:
        raise InvalidExperiment(f"unknown experiment sections {unknown} (accepted: {', '.join(SECTIONS)})")
    model = experiment.get("model")
    if not isinstance(model, Mapping) or "net" not in model or "optimizer" not in model:
        raise InvalidExperiment("model must hold net and optimizer")
    extra = sorted(set(model) - MODEL_OPTIONS)
    if extra:
        raise InvalidExperiment(f"model.{extra[0]} is not accepted (accepted: {sorted(MODEL_OPTIONS)})")
    checked(model["net"], NETWORKS, "model.net")
    checked(model["optimizer"], OPTIMIZERS, "model.optimizer", partial_call=True)
    _check_plain({k: v for k, v in model.items() if k not in ("net", "optimizer")}, "model")
    _check_trainer(experiment.get("trainer") or {})
    augment = (experiment.get("data") or {}).get("augment") or {}
    unknown = sorted(set(augment) - set(AUGMENT_OPTIONS))
    if unknown:
        raise InvalidExperiment(
            f"data.augment.{unknown[0]} is not an augmentation option "
            f"(accepted: {', '.join(AUGMENT_OPTIONS)})"
        )
    for section in SECTIONS:
        if section not in ("model", "trainer") and section in experiment:
            _check_plain(experiment[section], section)


def experiment_yaml(cfg: DictConfig) -> str:
    """The resolved, site-independent part of the config, as one line of YAML (JSON).

    Raises :class:`pipeline.contracts.experiment.InvalidExperiment` for a config no site
    would accept (a component outside the allow-list), so that the coordinator fails first."""
    keys = [key for key in SECTIONS if key in cfg]
    shared = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))
    check_experiment(shared)
    return json.dumps(shared, separators=(",", ":"))


def experiment_from_yaml(text: str) -> DictConfig:
    """The experiment in the JSON text written by :func:`experiment_yaml`, checked by
    :func:`pipeline.contracts.experiment.check_experiment` before anything is built."""
    try:
        experiment = json.loads(text)
    except (TypeError, ValueError) as error:
        raise InvalidExperiment(f"{CONFIG_KEY} is not the JSON of an experiment ({error})") from None
    check_experiment(experiment)
    return OmegaConf.create(experiment)
