"""The pipelines' one error type, apart from the loader so that every pipeline can raise it."""
from utils import UserError


class BadImageError(UserError):
    """An unreadable image: one line naming the file and the fix.

    Raised in a DataLoader worker, it reaches the training process re-created by torch's
    ExceptionWrapper.reraise as BadImageError("Caught BadImageError in DataLoader worker
    process N.\nOriginal Traceback ...\n<module>.BadImageError: <our line>"); the
    traceback's last line is Python's standard "Type: message", so our line is what
    follows the last "BadImageError: ".
    """

    def __init__(self, message):
        if '\n' in message and 'BadImageError: ' in message:
            message = message.rsplit('BadImageError: ', 1)[1].strip().splitlines()[0]
        super().__init__(message)
