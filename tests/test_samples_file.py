"""gpt2/samples_file.py: what sample.py prints is the samples file it writes."""
from gpt2 import samples_file


def test_printed_samples_are_the_file_and_read_back(capsys, tmp_path):
    texts = ['one\ntwo', '', 'three']
    samples_file.print_samples(texts)
    assert capsys.readouterr().out == samples_file.format_samples(texts)
    samples_file.print_samples(texts, quiet=True)
    assert capsys.readouterr().out == 'one\ntwo\n\nthree\n'
    rule = '=' * 40
    assert samples_file.format_samples(['a', 'b']) == (f'{rule} SAMPLE 1 {rule}\na\n'
                                                       f'{rule} SAMPLE 2 {rule}\nb\n')
    path = tmp_path / 'samples.txt'
    path.write_text(samples_file.format_samples(texts), encoding='utf-8')
    assert samples_file.read(str(path)) == samples_file.format_samples(texts)
