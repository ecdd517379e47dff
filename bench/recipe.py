"""The Sonnet 2 vqvae_example notebook's model and train step: the baseline.

A self-contained copy of google-deepmind/sonnet `examples/vqvae_example.ipynb`
(model cell and training cell): its `ResidualStack`, `Encoder`, `Decoder` and
`VQVAEModel` classes as the notebook writes them, stock
`snt.nets.VectorQuantizerEMA` (the notebook's `vq_use_ema = True`),
`snt.optimizers.Adam` and the notebook's plain `@tf.function` step, which takes
a {'image': [B, 32, 32, 3]} batch and returns the whole model output. It
imports nothing from `sonnet_vqvae`, so "vs the recipe" figures compare our
code with the notebook's, not with itself.

The notebook's data are images / 255 - 0.5 and its data variance
np.var(train_images / 255); `sonnet_vqvae.input_pipeline` makes the same.
Two things of the notebook's training cell are left to the caller: its
dataset (callers feed the same batches to both sides) and its loop, which
breaks after step index `num_training_updates`, i.e. one step more than asked.

`copy_variables` starts the recipe from another model's weights (ours), by
variable name and shape.
"""

from typing import Callable, Dict, Iterable, NamedTuple

import sonnet as snt
import tensorflow as tf

# The notebook's training cell.
NOTEBOOK_HYPERPARAMETERS = dict(
    num_hiddens=128,
    num_residual_hiddens=32,
    num_residual_layers=2,
    embedding_dim=64,
    num_embeddings=512,
    commitment_cost=0.25,
    decay=0.99,
    learning_rate=3e-4,
)
# And its batch: batch_size = 32.
NOTEBOOK_BATCH_SIZE = 32


# pylint: disable=missing-class-docstring,missing-function-docstring
# pylint: disable=super-with-arguments
# --- The notebook's model cell, verbatim but for 2-space layout. ---


class ResidualStack(snt.Module):
  def __init__(self, num_hiddens, num_residual_layers, num_residual_hiddens,
               name=None):
    super(ResidualStack, self).__init__(name=name)
    self._num_hiddens = num_hiddens
    self._num_residual_layers = num_residual_layers
    self._num_residual_hiddens = num_residual_hiddens

    self._layers = []
    for i in range(num_residual_layers):
      conv3 = snt.Conv2D(
          output_channels=num_residual_hiddens,
          kernel_shape=(3, 3),
          stride=(1, 1),
          name="res3x3_%d" % i)
      conv1 = snt.Conv2D(
          output_channels=num_hiddens,
          kernel_shape=(1, 1),
          stride=(1, 1),
          name="res1x1_%d" % i)
      self._layers.append((conv3, conv1))

  def __call__(self, inputs):
    h = inputs
    for conv3, conv1 in self._layers:
      conv3_out = conv3(tf.nn.relu(h))
      conv1_out = conv1(tf.nn.relu(conv3_out))
      h += conv1_out
    return tf.nn.relu(h)  # Resnet V1 style


class Encoder(snt.Module):
  def __init__(self, num_hiddens, num_residual_layers, num_residual_hiddens,
               name=None):
    super(Encoder, self).__init__(name=name)
    self._num_hiddens = num_hiddens
    self._num_residual_layers = num_residual_layers
    self._num_residual_hiddens = num_residual_hiddens

    self._enc_1 = snt.Conv2D(
        output_channels=self._num_hiddens // 2,
        kernel_shape=(4, 4),
        stride=(2, 2),
        name="enc_1")
    self._enc_2 = snt.Conv2D(
        output_channels=self._num_hiddens,
        kernel_shape=(4, 4),
        stride=(2, 2),
        name="enc_2")
    self._enc_3 = snt.Conv2D(
        output_channels=self._num_hiddens,
        kernel_shape=(3, 3),
        stride=(1, 1),
        name="enc_3")
    self._residual_stack = ResidualStack(
        self._num_hiddens,
        self._num_residual_layers,
        self._num_residual_hiddens)

  def __call__(self, x):
    h = tf.nn.relu(self._enc_1(x))
    h = tf.nn.relu(self._enc_2(h))
    h = tf.nn.relu(self._enc_3(h))
    return self._residual_stack(h)


class Decoder(snt.Module):
  def __init__(self, num_hiddens, num_residual_layers, num_residual_hiddens,
               name=None):
    super(Decoder, self).__init__(name=name)
    self._num_hiddens = num_hiddens
    self._num_residual_layers = num_residual_layers
    self._num_residual_hiddens = num_residual_hiddens

    self._dec_1 = snt.Conv2D(
        output_channels=self._num_hiddens,
        kernel_shape=(3, 3),
        stride=(1, 1),
        name="dec_1")
    self._residual_stack = ResidualStack(
        self._num_hiddens,
        self._num_residual_layers,
        self._num_residual_hiddens)
    self._dec_2 = snt.Conv2DTranspose(
        output_channels=self._num_hiddens // 2,
        output_shape=None,
        kernel_shape=(4, 4),
        stride=(2, 2),
        name="dec_2")
    self._dec_3 = snt.Conv2DTranspose(
        output_channels=3,
        output_shape=None,
        kernel_shape=(4, 4),
        stride=(2, 2),
        name="dec_3")

  def __call__(self, x):
    h = self._dec_1(x)
    h = self._residual_stack(h)
    h = tf.nn.relu(self._dec_2(h))
    x_recon = self._dec_3(h)
    return x_recon


class VQVAEModel(snt.Module):
  def __init__(self, encoder, decoder, vqvae, pre_vq_conv1,
               data_variance, name=None):
    super(VQVAEModel, self).__init__(name=name)
    self._encoder = encoder
    self._decoder = decoder
    self._vqvae = vqvae
    self._pre_vq_conv1 = pre_vq_conv1
    self._data_variance = data_variance

  def __call__(self, inputs, is_training):
    z = self._pre_vq_conv1(self._encoder(inputs))
    vq_output = self._vqvae(z, is_training=is_training)
    x_recon = self._decoder(vq_output['quantize'])
    recon_error = tf.reduce_mean((x_recon - inputs) ** 2) / self._data_variance
    loss = recon_error + vq_output['loss']
    return {
        'z': z,
        'x_recon': x_recon,
        'loss': loss,
        'recon_error': recon_error,
        'vq_output': vq_output,
    }


# pylint: enable=missing-class-docstring,missing-function-docstring
# pylint: enable=super-with-arguments
# --- End of the notebook's model cell. ---


class Recipe(NamedTuple):
  """The notebook's modules, optimizer and train step.

  Attributes:
    model: the notebook's `VQVAEModel` (variables created on its first call).
    encoder, decoder, pre_vq_conv1: its sub-modules, as the notebook names them.
    quantizer: its stock `snt.nets.VectorQuantizerEMA` (the notebook's vq_vae).
    optimizer: `snt.optimizers.Adam(learning_rate)`.
    train_step: the notebook's `@tf.function` step: train_step({'image':
      [B, 32, 32, 3]}) trains once and returns the model output dict (z,
      x_recon, loss, recon_error, vq_output).
    data_variance: the variance the model divides the MSE by.
  """
  model: VQVAEModel
  encoder: Encoder
  decoder: Decoder
  pre_vq_conv1: snt.Conv2D
  quantizer: snt.nets.VectorQuantizerEMA
  optimizer: snt.optimizers.Adam
  train_step: Callable[[Dict[str, tf.Tensor]], Dict[str, object]]
  data_variance: float


def build_recipe(data_variance: float,
                 num_hiddens: int = 128,
                 num_residual_hiddens: int = 32,
                 num_residual_layers: int = 2,
                 embedding_dim: int = 64,
                 num_embeddings: int = 512,
                 commitment_cost: float = 0.25,
                 decay: float = 0.99,
                 learning_rate: float = 3e-4) -> Recipe:
  """Builds the notebook's modules and train step (defaults: the notebook's).

  Args:
    data_variance: variance of the training images in [0, 1] scale.
    num_hiddens, num_residual_hiddens, num_residual_layers: model sizes.
    embedding_dim, num_embeddings, commitment_cost, decay: the quantizer's.
    learning_rate: Adam's.

  Returns:
    The `Recipe`; no variable exists before the model's first call.
  """
  # --- The notebook's training cell ("Build modules" and train_step). ---
  encoder = Encoder(num_hiddens, num_residual_layers, num_residual_hiddens)
  decoder = Decoder(num_hiddens, num_residual_layers, num_residual_hiddens)
  pre_vq_conv1 = snt.Conv2D(output_channels=embedding_dim,
                            kernel_shape=(1, 1),
                            stride=(1, 1),
                            name="to_vq")
  vq_vae = snt.nets.VectorQuantizerEMA(
      embedding_dim=embedding_dim,
      num_embeddings=num_embeddings,
      commitment_cost=commitment_cost,
      decay=decay)
  model = VQVAEModel(encoder, decoder, vq_vae, pre_vq_conv1,
                     data_variance=data_variance)
  optimizer = snt.optimizers.Adam(learning_rate=learning_rate)

  @tf.function
  def train_step(data):
    with tf.GradientTape() as tape:
      model_output = model(data['image'], is_training=True)
    trainable_variables = model.trainable_variables
    grads = tape.gradient(model_output['loss'], trainable_variables)
    optimizer.apply(grads, trainable_variables)

    return model_output
  # --- End of the notebook's code. ---

  return Recipe(model, encoder, decoder, pre_vq_conv1, vq_vae, optimizer,
                train_step, data_variance)


def hyperparameters(config) -> Dict[str, float]:
  """`build_recipe`'s keyword arguments read from a config with those keys."""
  return {key: getattr(config, key) for key in NOTEBOOK_HYPERPARAMETERS}


def variable_key(variable: tf.Variable) -> str:
  """A variable's name without the ':0' output suffix, e.g. 'encoder/enc_1/w'.

  Sonnet names variables by module names, which both our model and the
  notebook's use alike, while their checkpoint paths (attribute names) differ.
  """
  return variable.name.rsplit(":", 1)[0]


def copy_variables(source: Iterable[tf.Variable],
                   target: Iterable[tf.Variable]) -> int:
  """Assigns each target variable the source variable of the same name.

  Args:
    source: variables to read, e.g. our model's `variables`; those the target
      lacks must be non-trainable (e.g. our quantizer's usage statistics).
    target: variables to write, e.g. the notebook model's `variables`.

  Returns:
    The number of variables copied (all of `target`).

  Raises:
    ValueError: if a target variable has no source of its name, a trainable
      source variable has no target, a name occurs twice on one side, or two
      matched variables differ in shape or dtype. Nothing is assigned then.
  """
  sources = _by_key(source, "source")
  targets = _by_key(target, "target")
  missing = sorted(set(targets) - set(sources))
  unused = sorted(key for key in set(sources) - set(targets)
                  if sources[key].trainable)
  mismatched = sorted(
      f"{key}: {sources[key].shape} {sources[key].dtype.name} vs "
      f"{targets[key].shape} {targets[key].dtype.name}"
      for key in set(sources) & set(targets)
      if (sources[key].shape != targets[key].shape or
          sources[key].dtype != targets[key].dtype))
  if missing or unused or mismatched:
    raise ValueError(
        "copy_variables: the two models' variables do not match; rename or "
        f"resize them. Target variables without a source: {missing}; "
        f"trainable source variables without a target: {unused}; "
        f"shape or dtype mismatches: {mismatched}.")
  for key, variable in targets.items():
    variable.assign(sources[key])
  return len(targets)


def _by_key(variables: Iterable[tf.Variable],
            side: str) -> Dict[str, tf.Variable]:
  keyed = {}
  for variable in variables:
    key = variable_key(variable)
    if key in keyed:
      raise ValueError(f"copy_variables: two {side} variables are named "
                       f"{key!r}; give the modules distinct names.")
    keyed[key] = variable
  return keyed
