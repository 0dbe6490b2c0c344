"""gpt2/errors.py: the one whole-number and choice checks every flag goes through."""
import pytest

from gpt2 import errors
from gpt2 import sampling
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
        sampling.check_controls(length=5, temperature=1.0, top_k=0, top_p=1.0,
                                repetition_penalty=1.0, nsamples=True)
