"""Evaluations of an encoder: features, kNN, the linear probe, accuracy, reconstruction panels."""
