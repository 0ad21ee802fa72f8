"""Gradient estimators: what the directions z are and where the losses are taken. One module per estimator."""
