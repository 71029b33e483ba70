"""Classification networks for chest radiographs."""
