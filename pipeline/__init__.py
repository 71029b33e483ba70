"""fedrad: federated, privacy-preserving training for chest radiographs.

Packages along the data's path, each importing only the layers below it (checked by
import-linter, see ``[tool.importlinter]`` in ``pyproject.toml``)::

    cli           command-line help shared by scripts/
    support       demo sites, loopback grid and deployment, de-identification scan
    deployment    coordinator and site processes on Flower's deployment engine
    federation    ServerApp, ClientApp, SecAgg+, round selection, resume
    evaluation    scores, clinical report, privacy audit, baseline
    governance    approvals, signed site ledger, revocation, privacy budget
    training      Lightning data module, classifier, loop, checkpoints, pretraining
    privacy       DP-SGD, clipping, noise, SecAgg+ settings
    ingestion     hostile-file-safe reading, acceptance, pseudonyms, splits, preprocessing
    contracts     layouts, cache format, labels, experiment, message keys and packing, files, console
"""
