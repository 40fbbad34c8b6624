"""weather-restore: train, evaluate, export and promote models that remove rain, haze and snow from video."""

__version__ = "0.1.0"
