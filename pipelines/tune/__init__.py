"""Distributed hyperparameter tuning: one Optuna study on PostgreSQL, W workers pulling trials of
the real trainer, pruning on each epoch's validation loss, every trial a nested MLflow run."""
