"""Ignite engines: small step closures; validation, checkpoints, LR, early stop and logging are handlers.

Never imports mlflow: metrics leave through a plain ``log(metrics, step)`` callback.
"""
