"""The errors a user can fix, in one light module: the command line catches them (one line, exit 2)
without importing torch or transformers first, so `--help` and a config typo answer at once."""


class ConfigError(ValueError):
    """A config key, file or command-line option that cannot be used; the message names it."""


class DataError(ValueError):
    """Malformed or missing data; the message names the file/line/field."""


class MetricsError(ValueError):
    """Malformed metric input; the message is one line naming the file/line or the item at fault."""


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message names the model or file."""


class SplitError(ValueError):
    """A model or split point the splitter cannot handle; the message names the field."""


class CertError(ValueError):
    """A certificate or key file is missing, unreadable or unusable; the message names the file."""


class CostError(ValueError):
    """A profile or cost setting that cannot be used; the message names the field."""


class DecodeError(RuntimeError):
    """Decoding that would be wrong (a KV cache that did not reach the parts); the message says why."""


class RunError(RuntimeError):
    """A run that cannot go on (no client left to train); the message says why, in one line."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after the step under way, with a checkpoint written."""

    def __init__(self, step: int, checkpoint, signal_name: str, resume_command: str = ""):
        super().__init__(f"{signal_name} after step {step}; checkpoint written to {checkpoint}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        self.resume_command = resume_command


USER_ERRORS = (ConfigError, DataError, MetricsError, ModelError, SplitError, CertError, CostError, DecodeError,
               FileNotFoundError, FileExistsError, PermissionError, ConnectionError, TimeoutError)
