"""One exception per domain. The CLI catches `WeatherRestoreError` once and prints it without a traceback."""


class WeatherRestoreError(Exception):
    """Base of every error the project raises on purpose; its message says what and where."""


class ConfigError(WeatherRestoreError):
    """params.yaml (or the file given with --params) holds an unknown key, a wrong type or an out-of-range value.

    A stage that judges a setting validation cannot (a photograph this machine lacks) names it by `key`, not by
    file: the CLI, which knows which params file it read, puts that file's name in front (`in_file`)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"params.yaml {key}: {message}" if key else message)
        self.key, self.problem = key, message

    def in_file(self, params_file: object) -> str:
        """The message, naming `params_file` as the home of `key`."""
        return f"{params_file}: {self.key}: {self.problem}" if self.key else str(self)


class DataError(WeatherRestoreError):
    """A dataset tree, a frame or a manifest is missing, unreadable or inconsistent."""


class ClipError(DataError):
    """Clips cannot be cut or split as asked (frame counts, sizes, counts per weather)."""


class ModelFileError(WeatherRestoreError):
    """A checkpoint, ONNX file or registry URI does not hold the model that was asked for."""


class ExportError(WeatherRestoreError):
    """The ONNX graph could not be made, or does not compute what the PyTorch model computes."""


class OutputError(WeatherRestoreError):
    """An output path would replace or delete something the tool did not write (a user's folder, the input)."""


class TrainingError(WeatherRestoreError):
    """Training cannot go on: a non-finite loss, or a batch size that does not divide among the processes."""


class RegistryError(WeatherRestoreError):
    """The model registry cannot do what was asked: a run not tracked or not evaluated, no version to roll back to."""


class PromotionRefused(RegistryError):
    """A version failed the promotion gate; the message holds the comparison table and the reasons."""
