"""The learning loop: models, pseudo-labels, replay, EWC, validation."""
