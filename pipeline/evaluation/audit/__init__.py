"""Attack-based privacy audit: membership inference, gradient inversion, report and release policy."""
