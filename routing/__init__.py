"""The ETR method (installed as ``etr.routing``): query-set collection, expert-token training, evaluation."""
