"""Default hyperparameters: the reference VQ-VAE run on CIFAR-10.

Model, quantizer and optimizer sizes follow the Sonnet 2 vqvae_example
notebook, including its EMA codebook (`vq_use_ema = True`; the VQ-VAE paper,
appendix A.1, reports that it converges faster, and it does not depend on the
optimizer's learning rate). num_steps=10_000 is the notebook's budget on
CIFAR-10 ("10k steps gives reasonable accuracy"; its loop runs 10,001); 100k
was the TF1 example's budget for a GPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the reference configuration (override with --config.key=value)."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "cifar10"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.download = True
  config.shuffle_buffer = 10_000
  # The split evaluate reads; e.g. "validation" for imagenet_resized/64x64.
  config.eval_split = "test"

  # Model.
  config.num_hiddens = 128
  config.num_residual_hiddens = 32
  config.num_residual_layers = 2
  config.embedding_dim = 64
  config.num_embeddings = 512
  # VQ-VAE-2 (`hierarchical`): 1 is the plain VQ-VAE; L >= 2 adds L - 1
  # levels above it, each halving the grid (32x32 images: 8x8, 4x4, ...).
  config.num_levels = 1
  # Codebook size of each level, top first, e.g. (512, 512); None: every
  # level has num_embeddings codes.
  config.level_num_embeddings = ml_collections.config_dict.placeholder(tuple)
  config.commitment_cost = 0.25
  config.use_ema = True
  config.decay = 0.99
  # Codebook-health options passed to the quantizer (all off: stock behaviour).
  config.quantizer = ml_collections.ConfigDict()
  config.quantizer.usage_decay = 0.99
  config.quantizer.dead_code_threshold = 0.0
  config.quantizer.kmeans_init = False
  config.quantizer.kmeans_iters = 10
  config.quantizer.cosine = False
  # The bottleneck: "vq", "ema", "residual", "fsq" or "lfq"
  # (docs/quantizers.md); None: "ema" if use_ema else "vq".
  config.quantizer.kind = ml_collections.config_dict.placeholder(str)
  # vq, ema, residual: the gradient to the encoder, "straight_through" or
  # "rotation" (the rotation trick, Fifty et al. 2024).
  config.quantizer.gradient = "straight_through"
  # residual: num_stages codebooks of num_embeddings codes (EMA if use_ema),
  # each quantizing what the ones before left; one codebook for all stages;
  # the share of training examples cut to a random number of stages.
  config.quantizer.num_stages = 4
  config.quantizer.shared_codebook = False
  config.quantizer.quantizer_dropout = 0.0
  # fsq: values of each channel; embedding_dim and num_embeddings are
  # len(levels) and prod(levels) (the config's are not read).
  config.quantizer.levels = (8, 5, 5, 5)
  # lfq: log2(num_embeddings) channels, each quantized to its sign; the
  # weight of the entropy penalty and of its batch (diversity) term.
  config.quantizer.entropy_weight = 0.1
  config.quantizer.diversity_gamma = 1.0

  # Optimisation.
  config.learning_rate = 3e-4
  config.batch_size = 32  # Global, split evenly across replicas.
  config.num_steps = 10_000
  config.seed = 0
  # XLA for the train step: True, False or "auto", which times both on the
  # first steps and keeps the faster (which one wins depends on the model and
  # the machine; see loop.select_loop).
  config.jit_compile = ml_collections.config_dict.FieldReference(
      "auto", field_type=object)
  # Train steps per call of the compiled loop; None: up to the next log or
  # checkpoint step, so the host reads metrics once per log_every steps.
  config.steps_per_loop = ml_collections.config_dict.placeholder(int)
  # None (float32), "auto", "bfloat16" or "float16": the convolutions compute
  # in that type on float32 variables; "auto" picks bfloat16 on TPUs, GPUs of
  # compute capability >= 8.0, CPUs with AMX-BF16, and CPUs with AVX512-BF16
  # where a timed probe finds it faster (see `precision`).
  # float32 is the default: bfloat16 cost 2.4% test NMSE at 3,000 steps over
  # two seeds, above the 2% that "auto" as default needed (bench/RESULTS.md).
  config.mixed_precision = ml_collections.config_dict.placeholder(str)
  # "auto", "default" (one device), "replicator", "tpu" or "multi_worker"
  # (distribute.STRATEGIES).
  config.strategy = "auto"

  # Logging, checkpoints and evaluation.
  config.log_every = 100
  config.checkpoint_every = 1000
  config.max_checkpoints_to_keep = 3
  config.eval_batch_size = 256
  return config
