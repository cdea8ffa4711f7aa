"""User-facing errors: the message says what is wrong and how to fix it; the CLI and widgets show it as it is."""


class VirtualStainError(ValueError):
    """Bad input, a bad checkpoint or a bad option: shown to the user without a traceback."""


class BundleError(VirtualStainError):
    """A checkpoint folder that cannot be loaded."""


class Cancelled(RuntimeError):
    """Raised between diffusion steps when the caller asked to stop; nothing partial is returned."""
