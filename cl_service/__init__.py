"""cl-service: a continual and semi-supervised learning service for visual inspection."""

__version__ = "0.1.0"
