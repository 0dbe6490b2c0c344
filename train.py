"""Fine-tune GPT-2 or train one from scratch, saving resumable checkpoints in OpenAI's format."""
from gpt2 import cli, quiet

quiet.import_tensorflow()

from gpt2 import settings, training  # noqa: E402


def train(dataset=None, **flags):
    """Train on --dataset and save checkpoint/RUN/model-STEP.* every --save_every steps.

    Data:
      --dataset PATH            .npz from encode.py, a text file, a folder or a glob
      --curriculum SPEC         "a.npz:1000,b.npz:1000": 1000 steps on a, then 1000 on b (training
                                stops after the last unless --steps is larger); "a.txt,b.txt,c.txt"
                                (no counts): swap to the next dataset, cycling, at every save
      --combine N               join small text files into chunks of N characters (50000)
      --seq_len N               tokens per training window (default n_ctx; each window draws
                                seq_len + 1 tokens and predicts the last seq_len)
    Model:
      --model_name NAME         fine-tune models/NAME (download_model.py NAME fetches it)
      --models_dir DIR          where downloaded models live (models)
      --from_scratch            start from random weights with --hparams
      --hparams P               a preset (124M, 355M, 774M, 1558M, tiny, small) or hparams.json
    Run:
      --run_name NAME           checkpoints in CHECKPOINT_DIR/NAME, samples in SAMPLE_DIR/NAME
      --checkpoint_dir DIR      (checkpoint)        --sample_dir DIR (samples)
      --restore_from WHAT       latest (the run's newest checkpoint, else the model), fresh (the
                                model or random weights, step 0), or a checkpoint path; a
                                checkpoint saved by train.py resumes exactly (optimizer, step,
                                data position, noise)
      --steps N                 stop at global step N (Ctrl-C or SIGTERM also stop: the step in
                                flight finishes and is saved); also the horizon of --lr_schedule
    Optimisation:
      --batch_size N (1)  --accumulate_gradients N (1: average N batches per update)
      --learning_rate LR (1e-4)  --lr_schedule constant|linear|cosine  --warmup_steps N (0)
      --optimizer adam|adamw|sgd|adafactor (adam)
      --weight_decay WD         on matrices and embeddings only (default 0.01 for adamw, else 0)
      --max_grad_norm X         clip the global gradient norm to X
      --memory_saving_gradients recompute each block during backprop (less memory, ~1/3 slower)
      --layerwise               backprop a block at a time and apply its update at once, so the
                                whole model's gradients never exist (recomputes as above; not
                                with --max_grad_norm or fp16); README "Memory" has the figures
      --only_train_transformer_layers   freeze wte, wpe and ln_f
      --noise P                 replace each input token by a random one with probability P
      --seed N                  weights (from scratch), data order and noise (0)
      --precision fp32|bf16|fp16  the type of the products (mixed precision): weights, optimizer
                                state, layer norms, softmax and the loss stay float32; fp16 scales
                                the loss, skipping (and counting) steps that overflow. fp32 (the
                                default); README "Precision" says when to pick which
      --nojit_compile           run the step on TF's kernels instead of XLA (for fp32 slower;
                                bf16 and fp16 take TF's kernels on a CPU unless --jit_compile)
    Devices (README "Several devices and machines"):
      --strategy none|mirrored|multi_worker|tpu   one device (none); every GPU of this machine
                                (mirrored); the machines named by TF_CONFIG (multi_worker); a TPU
                                (tpu). --batch_size is the global batch, split over the replicas
      --tpu NAME                the TPU for --strategy tpu (its name or grpc://ADDRESS:8470;
                                default: this machine's)
    Output:
      --save_every N (1000)  --max_checkpoints N (keep all by default)
      --keep_optimizer_state latest|all   which checkpoints keep the optimizer's slots (for Adam
                                twice the weights): the newest only (latest; an older one resumes
                                its step and data position with a fresh optimizer), or every one
      --sample_every N (100, 0 = never)  --sample_length N (200)  --sample_num N (1)
      --val_dataset PATH  --val_every N (0 = never)  --val_batch_size N (2)
      --val_batch_count N (40)
      --progress / --noprogress the tqdm bar
    TensorBoard scalars (loss, val_loss, learning_rate, tokens_per_second; loss_scale and
    skipped_steps with fp16) go to the run folder, and the same values, a line per step, to its
    log.jsonl (which sample.py atlas reads).
    """
    training.run(settings.TrainSettings.from_flags(dataset=dataset, **flags))


# The flags, their defaults and their checks are TrainSettings' fields, written once there; fire
# reads this signature for parsing and --help.
train.__signature__ = settings.TrainSettings.signature(train)


if __name__ == '__main__':
    cli.main(train)
