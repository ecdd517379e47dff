"""The Sonnet 2 vqvae_example notebook's training recipe, the benchmarks' baseline.

Stock `snt.nets.VectorQuantizerEMA`, `snt.optimizers.Adam` and the notebook's
plain `@tf.function` step that returns the whole model output.
"""

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import networks


def recipe_model_and_step(config, data_variance: float):
  """Returns (model, train_step(images) -> model output) of the recipe."""
  sizes = (config.num_hiddens, config.num_residual_layers,
           config.num_residual_hiddens)
  model = networks.VQVAEModel(
      networks.Encoder(*sizes), networks.Decoder(*sizes),
      snt.nets.VectorQuantizerEMA(config.embedding_dim, config.num_embeddings,
                                  config.commitment_cost, config.decay),
      snt.Conv2D(config.embedding_dim, 1, name="to_vq"), data_variance)
  optimizer = snt.optimizers.Adam(config.learning_rate)

  @tf.function
  def train_step(data):
    with tf.GradientTape() as tape:
      model_output = model(data, is_training=True)
    trainable_variables = model.trainable_variables
    grads = tape.gradient(model_output["loss"], trainable_variables)
    optimizer.apply(grads, trainable_variables)
    return model_output

  return model, train_step
