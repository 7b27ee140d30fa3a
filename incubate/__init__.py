"""deep-incubate: train large models by Deep Model Assembling / Deep Incubation."""

__version__ = "0.1.0"
