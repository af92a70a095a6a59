"""kdbench: benchmark and tune knowledge-distillation methods on accuracy and feature-space geometry."""

__version__ = "0.1.0"
