"""The project's one base error: something the user can fix (a config value, a missing or malformed file).

Every such error names the file, key or field in its message; the ``cxr`` command prints it without a traceback
and exits with status 2. Bugs stay ordinary exceptions and keep their traceback.
"""


class CxrError(Exception):
    """A user-fixable error; subclasses say which kind (config, shards, checkpoint, ensemble settings, ...)."""
