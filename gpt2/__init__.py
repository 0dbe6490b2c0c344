"""gpt2-tf: OpenAI's GPT-2 as pure TensorFlow 2 functions over a parameter tree."""
