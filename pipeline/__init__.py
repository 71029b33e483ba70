"""fedrad pipeline: site preprocessing, training, federation and evaluation."""
