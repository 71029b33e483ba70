"""Privacy in training: SecAgg+ settings, DP-SGD with Opacus and each site's privacy ledger."""
