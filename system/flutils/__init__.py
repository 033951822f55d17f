"""The experiment harness around the federated algorithms: flags, datasets, results, plots, paths, errors."""
