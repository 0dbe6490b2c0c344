"""gpt2/errors.py: the one whole-number and choice checks every flag goes through."""
import pytest

from gpt2 import errors
from gpt2 import settings
from gpt2.errors import UserError


@pytest.mark.parametrize('value, ok', [(0, True), (3, True), (-1, False), (2.0, False),
                                       ('2', False), (True, False), (None, False)])
def test_is_whole(value, ok):
    # A bare `--nsamples` reaches the library as True, which Python counts as the int 1.
    assert errors.is_whole(value) is ok


def test_messages_name_the_flag_the_value_and_the_bound():
    assert errors.not_whole('every', 5, at_least=1) is None
    assert errors.not_whole('every', 0, at_least=1, note='tokens') == \
        '--every must be a whole number >= 1, got 0 (tokens)'
    with pytest.raises(UserError, match=r"^unknown --unit 'word': expected one of line, sentence"):
        errors.check_choice('unit', 'word', ('line', 'sentence'))


def test_sampling_refuses_a_bare_flag_as_a_count():
    with pytest.raises(UserError, match=r'--nsamples must be a whole number >= 1, got True'):
        settings.SampleSettings(length=5, temperature=1.0, top_k=0, top_p=1.0,
                                repetition_penalty=1.0, nsamples=True)


def test_ctrl_c_raised_inside_a_c_callback_exits_130_in_one_line(tmp_path):
    """A second Ctrl-C can land while C code calls back into Python (numpy's __array__ under
    tf.constant); CPython then raises SystemError caused by the KeyboardInterrupt. The scripts
    still exit 130 with 'interrupted'; any other SystemError keeps its traceback.

    Break caught (verified): cli.main catching KeyboardInterrupt alone (exit 1, a traceback; CI
    saw this in test_a_second_ctrl_c_stops_at_once)."""
    import subprocess
    import sys
    script = tmp_path / 'run.py'
    script.write_text(
        'import sys\n'
        'from gpt2 import cli\n'
        'def go(kind):\n'
        '    try:\n'
        '        raise KeyboardInterrupt\n'
        '    except KeyboardInterrupt as e:\n'
        '        if kind == "wrapped":\n'
        '            raise SystemError("__array__ returned a result with an exception set") from e\n'
        '    raise SystemError("a real bug")\n'
        'cli.main(go, name="run.py")\n')
    root = __file__.rsplit('/tests/', 1)[0]
    got = {k: subprocess.run([sys.executable, str(script), k], capture_output=True, text=True,
                             cwd=root, env={'PYTHONPATH': root})
           for k in ('wrapped', 'bug')}
    assert got['wrapped'].returncode == 130
    assert got['wrapped'].stderr.strip() == 'run.py: error: interrupted'
    assert got['bug'].returncode == 1 and 'SystemError: a real bug' in got['bug'].stderr
