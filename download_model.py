"""Download one of OpenAI's GPT-2 models: python download_model.py 124M"""
from gpt2 import cli, download, paths


def main(model_name, models_dir=paths.MODELS_DIR, mirror=None, force=False):
    """Fetch a released GPT-2 into MODELS_DIR/MODEL_NAME, resuming and checking every file.

    Files stream into FILE.part with a progress bar, resume with HTTP Range requests after a
    dropped connection, are retried with backoff, and take their final name only when their size
    matches the server's. Then every tensor is read once so TensorFlow checks its CRC; a corrupt
    download is deleted and reported. Files already complete are skipped.

    Args:
        model_name: 124M, 355M, 774M or 1558M. The old names are accepted and land in the new
            folders, 117M in MODELS_DIR/124M and 345M in MODELS_DIR/355M.
        models_dir: folder that holds one subfolder per model (created if missing).
        mirror: base address holding NAME/FILE to use instead of OpenAI's ({base}), as an
            http(s) or file address or a local folder; defaults to the {env} environment variable.
        force: download every file again, even those already complete.
    """
    folder = download.download(model_name, models_dir, mirror=mirror, force=force)
    print(f'{model_name} is ready in {folder}')


# The address and the variable's name come from the library, so --help cannot drift from them.
main.__doc__ = main.__doc__.format(base=download.BASE_URL, env=download.MIRROR_ENV)


if __name__ == '__main__':
    cli.main(main)
