"""Entry-point glue for the scripts: fire dispatch, one-line errors, non-zero exits."""
import errno
import sys

import fire

from gpt2.errors import USER_ERRORS


def main(component, *, name=None):
    """Run `component` with fire; turn a user error (USER_ERRORS) or OS error into one line on
    stderr.

    Exit codes: 0 ok, 1 bad input or a failed file operation, 130 interrupted.
    """
    prog = name or sys.argv[0].rsplit('/', 1)[-1]
    try:
        fire.Fire(component, name=prog)
    except USER_ERRORS as e:
        _die(prog, str(e))
    except OSError as e:
        # Full disk, permissions, a path that is a file: these come from the user's machine.
        why = e.strerror or str(e)
        where = f': {e.filename}' if getattr(e, 'filename', None) else ''
        hint = ' (free some space and run again)' if e.errno == errno.ENOSPC else ''
        _die(prog, f'{why}{where}{hint}')
    except KeyboardInterrupt:
        _die(prog, 'interrupted', code=130)
    except Exception as e:
        # Ctrl-C raised inside a callback from C (numpy's __array__ under tf.constant, say)
        # reaches Python as a SystemError caused by the KeyboardInterrupt.
        if not _caused_by_interrupt(e):
            raise
        _die(prog, 'interrupted', code=130)


def _caused_by_interrupt(e):
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _die(prog, message, code=1):
    print(f'{prog}: error: {message}', file=sys.stderr)
    sys.exit(code)
