"""Top-k accuracy of class scores: the figure every evaluation reports (kNN, probe, fine-tuning)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
  """Fraction of rows whose label is among the k highest scores (ties broken by class index)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return float((top == labels[:, None]).any(axis=1).mean())
