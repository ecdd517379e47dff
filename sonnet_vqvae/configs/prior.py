"""Hyperparameters of the gated PixelCNN prior over VQ-VAE codes."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default prior config.

  Model fields (hidden_channels, num_layers, kernel_size, class_conditional)
  are saved with the training run; sampling reads them from there and takes
  only the sampling fields from the config it is given.
  """
  config = ml_collections.ConfigDict()

  # Model. num_layers * (kernel_size // 2) >= 7 covers all of an 8x8 grid.
  config.hidden_channels = 64
  config.num_layers = 10
  config.kernel_size = 3
  config.class_conditional = True  # on the CIFAR-10 label

  # Training.
  config.batch_size = 32  # global, split over the replicas
  config.learning_rate = 3e-4
  config.num_steps = 3000
  config.log_every = 100
  config.checkpoint_every = 1000
  config.max_checkpoints_to_keep = 3
  config.seed = 0
  # As the VQ-VAE's: "auto", "default", "replicator", "tpu", "multi_worker".
  config.strategy = "auto"
  # As the VQ-VAE's (see loop.select_loop): True, False or "auto".
  config.jit_compile = ml_collections.config_dict.FieldReference(
      "auto", field_type=object)
  # Steps per call of the compiled loop; None: up to the next log step.
  config.steps_per_loop = ml_collections.config_dict.placeholder(int)

  # Data: None uses the VQ-VAE run's data_dir / download settings.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.download = ml_collections.config_dict.placeholder(bool)
  config.encode_batch_size = 256
  config.eval_batch_size = 256

  # Sampling (--mode=sample).
  config.num_samples = 64
  config.temperature = 1.0
  config.sample_label = -1  # < 0: labels cycle through the classes
  config.sample_seed = 0
  return config
