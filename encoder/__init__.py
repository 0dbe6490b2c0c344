"""GPT-2's byte-level BPE: OpenAI's token ids, with its vocabulary shipped in this package."""
from encoder.bpe import (EOT, EOT_ID, PATTERN, Encoder, EncoderError, bytes_to_unicode,
                         get_encoder, vocab_files)

__all__ = ['EOT', 'EOT_ID', 'PATTERN', 'Encoder', 'EncoderError', 'bytes_to_unicode', 'get_encoder',
           'vocab_files']
