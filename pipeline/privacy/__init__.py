"""Privacy in training: SecAgg+ settings (:mod:`.secagg`), DP-SGD with Opacus (:mod:`.dp`),
the fast per-sample clipper (:mod:`.clipping`) and cryptographic noise (:mod:`.randomness`).
Each site's spent budget is kept by :mod:`pipeline.governance.budget`."""
