"""Gated PixelCNN over grids of VQ-VAE code indices.

The autoregressive prior of van den Oord et al. (2016), "Conditional Image
Generation with PixelCNN Decoders": a vertical stack that sees every row above
the current position and a horizontal stack that sees the current row to its
left, joined so that the receptive field has no blind spot. Positions are
ordered in raster order (row by row, left to right). An optional spatial
condition (VQ-VAE-2: features of the coarser levels' codes) is added to both
stacks' gates, as the paper's conditional PixelCNN adds h through V * h.
"""

import math
from typing import Optional, Sequence, Tuple

import sonnet as snt
import tensorflow as tf


def _conv(inputs: tf.Tensor, kernel: tf.Variable | tf.Tensor,
          bias: tf.Variable) -> tf.Tensor:
  return tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID") + bias


def _gate(inputs: tf.Tensor) -> tf.Tensor:
  """Gated activation tanh(a) * sigmoid(b) over the two channel halves."""
  a, b = tf.split(inputs, 2, axis=-1)
  return tf.tanh(a) * tf.sigmoid(b)


class EagerModule(snt.Module):
  """Creates kernels and biases eagerly, so sampling loops never create them."""

  def __init__(self, name: Optional[str] = None):
    super().__init__(name=name)
    self._w_init = snt.initializers.VarianceScaling(1.0, "fan_avg", "uniform")

  def _conv_params(self, shape: Sequence[int],
                   name: str) -> Tuple[tf.Variable, tf.Variable]:
    kernel = tf.Variable(self._w_init(shape, tf.float32), name=f"{name}_kernel")
    bias = tf.Variable(tf.zeros([shape[-1]]), name=f"{name}_bias")
    return kernel, bias


def check_positive(**values: int):
  for key, value in values.items():
    if value < 1:
      raise ValueError(f"{key} must be >= 1, got {value}.")


def sampling_args(num_samples: int, labels, num_classes: Optional[int],
                  temperature: float) -> Tuple[Optional[tf.Tensor], tf.Tensor]:
  """Checks a draw's labels and temperature; returns them as tensors.

  Returns:
    ([num_samples] int32 labels, or None for an unconditional model; the
    float32 temperature).

  Raises:
    ValueError: for a temperature that is not a positive finite number, or
      labels given to an unconditional model or missing for a conditional one.
  """
  if not (temperature > 0 and math.isfinite(temperature)):
    raise ValueError(
        f"temperature must be a positive finite number, got {temperature}.")
  if (labels is None) != (num_classes is None):
    raise ValueError("labels must be given iff the model is class conditional "
                     f"(num_classes={num_classes}).")
  if labels is not None:
    labels = tf.broadcast_to(tf.cast(labels, tf.int32), [num_samples])
  return labels, tf.constant(temperature, tf.float32)


class GatedLayer(EagerModule):
  """One gated layer with a vertical and a horizontal stack.

  The vertical input at row i must already depend only on rows above i (the
  PixelCNN shifts it down once before the first layer); this layer's vertical
  convolution looks at rows i - kernel_size // 2 .. i of it, so it keeps that
  property. The horizontal convolution looks at columns j - kernel_size // 2
  .. j of the current row; mask type 'A' also drops column j, which the first
  layer needs because its horizontal input is the current code itself.
  """

  def __init__(self,
               hidden_channels: int,
               kernel_size: int,
               mask_type: str,
               num_classes: Optional[int] = None,
               condition_channels: Optional[int] = None,
               name: Optional[str] = None):
    """Constructs the layer.

    Args:
      hidden_channels: channels C of both stacks.
      kernel_size: odd width of the vertical kernel; the vertical kernel spans
        kernel_size // 2 + 1 rows, the horizontal one kernel_size // 2 + 1
        columns.
      mask_type: 'A' (first layer: excludes the current position and has no
        residual connection) or 'B' (later layers).
      num_classes: if set, a learned per-class bias is added to the gates of
        both stacks.
      condition_channels: if set, every call takes a [B, H, W,
        condition_channels] condition whose 1x1 projection is added to the
        gates of both stacks (it must not depend on this grid's codes).
      name: module name.

    Raises:
      ValueError: on non-positive sizes, an even kernel_size or an unknown
        mask_type.
    """
    super().__init__(name=name)
    check_positive(hidden_channels=hidden_channels, kernel_size=kernel_size)
    if kernel_size % 2 != 1:
      raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
    if mask_type not in ("A", "B"):
      raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}.")
    if num_classes is not None:
      check_positive(num_classes=num_classes)
    if condition_channels is not None:
      check_positive(condition_channels=condition_channels)
    c = hidden_channels
    self._half = kernel_size // 2
    self._mask_type = mask_type
    self._num_classes = num_classes
    with self.name_scope:
      self.vertical = self._conv_params([self._half + 1, kernel_size, c, 2 * c],
                                        "vertical")
      self.horizontal = self._conv_params([1, self._half + 1, c, 2 * c],
                                          "horizontal")
      self.vertical_to_horizontal = self._conv_params([1, 1, 2 * c, 2 * c],
                                                      "vertical_to_horizontal")
      self.horizontal_out = self._conv_params([1, 1, c, c], "horizontal_out")
      if num_classes is not None:
        class_init = snt.initializers.TruncatedNormal(stddev=1.0 / (2 * c)**0.5)
        self.vertical_class_bias = tf.Variable(
            class_init([num_classes, 2 * c], tf.float32),
            name="vertical_class_bias")
        self.horizontal_class_bias = tf.Variable(
            class_init([num_classes, 2 * c], tf.float32),
            name="horizontal_class_bias")
      if condition_channels is not None:
        self.vertical_condition = self._conv_params(
            [1, 1, condition_channels, 2 * c], "vertical_condition")
        self.horizontal_condition = self._conv_params(
            [1, 1, condition_channels, 2 * c], "horizontal_condition")
    self._condition_channels = condition_channels
    mask = [1.0] * self._half + [0.0 if mask_type == "A" else 1.0]
    self._horizontal_mask = tf.reshape(tf.constant(mask), [1, -1, 1, 1])

  def __call__(
      self,
      vertical: tf.Tensor,
      horizontal: tf.Tensor,
      labels: Optional[tf.Tensor] = None,
      condition: Optional[tf.Tensor] = None) -> Tuple[tf.Tensor, tf.Tensor]:
    """Applies the layer.

    Args:
      vertical: [B, H, W, C] vertical stack features (rows above only).
      horizontal: [B, H, W, C] horizontal stack features.
      labels: [B] int class labels; required iff num_classes was set.
      condition: [B, H, W, condition_channels] float features; required iff
        condition_channels was set.

    Returns:
      (vertical, horizontal): the two [B, H, W, C] outputs.
    """
    h = self._half
    padded = tf.pad(vertical, [[0, 0], [h, 0], [h, h], [0, 0]])
    vertical_pre = _conv(padded, *self.vertical)
    kernel, bias = self.horizontal
    padded = tf.pad(horizontal, [[0, 0], [0, 0], [h, 0], [0, 0]])
    horizontal_pre = _conv(padded, kernel * self._horizontal_mask, bias)
    if self._num_classes is not None:
      vertical_pre += tf.gather(self.vertical_class_bias, labels)[:, None, None]
      horizontal_pre += tf.gather(self.horizontal_class_bias,
                                  labels)[:, None, None]
    if self._condition_channels is not None:
      vertical_pre += _conv(condition, *self.vertical_condition)
      horizontal_pre += _conv(condition, *self.horizontal_condition)
    horizontal_pre += _conv(vertical_pre, *self.vertical_to_horizontal)
    out = _conv(_gate(horizontal_pre), *self.horizontal_out)
    # The type-A input holds the current code, so a residual would leak it.
    if self._mask_type == "B":
      out += horizontal
    return _gate(vertical_pre), out


class GatedPixelCNN(EagerModule):
  """Gated PixelCNN giving logits of each code given the codes before it.

  logits[b, i, j] depends only on indices[b, i', j'] with (i', j') before
  (i, j) in raster order, and, once num_layers * (kernel_size // 2) reaches
  W - 1 and H - 1, on all of them.
  """

  def __init__(self,
               num_embeddings: int,
               hidden_channels: int,
               num_layers: int,
               kernel_size: int,
               num_classes: Optional[int] = None,
               condition_channels: Optional[int] = None,
               name: Optional[str] = "gated_pixel_cnn"):
    """Constructs the model; all variables are created here.

    Args:
      num_embeddings: K, the number of codes (the VQ-VAE codebook size).
      hidden_channels: channels C of the code embedding and both stacks.
      num_layers: number of gated layers (the first has mask type 'A').
      kernel_size: odd kernel width of the gated layers.
      num_classes: if set, the model is class conditional and every call needs
        labels in [0, num_classes).
      condition_channels: if set, every call needs a [B, H, W,
        condition_channels] spatial condition (see `GatedLayer`).
      name: module name.

    Raises:
      ValueError: on non-positive sizes or an even kernel_size.
    """
    super().__init__(name=name)
    check_positive(num_embeddings=num_embeddings,
                    hidden_channels=hidden_channels, num_layers=num_layers)
    self._num_embeddings = num_embeddings
    self._num_classes = num_classes
    self._condition_channels = condition_channels
    with self.name_scope:
      self.embeddings = tf.Variable(
          snt.initializers.TruncatedNormal()([num_embeddings, hidden_channels],
                                             tf.float32),
          name="embeddings")
      self.layers = [
          GatedLayer(hidden_channels, kernel_size, "A" if i == 0 else "B",
                     num_classes, condition_channels,
                     name=f"gated_layer_{i}")
          for i in range(num_layers)
      ]
      self.head_hidden = self._conv_params(
          [1, 1, hidden_channels, hidden_channels], "head_hidden")
      self.head_logits = self._conv_params(
          [1, 1, hidden_channels, num_embeddings], "head_logits")

  @property
  def num_embeddings(self) -> int:
    return self._num_embeddings

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

  @property
  def condition_channels(self) -> Optional[int]:
    return self._condition_channels

  def _check_labels(self, labels, condition=None):
    if (labels is None) != (self._num_classes is None):
      raise ValueError(
          "labels must be given iff the model is class conditional "
          f"(num_classes={self._num_classes}).")
    if (condition is None) != (self._condition_channels is None):
      raise ValueError(
          "condition must be given iff the model has condition_channels "
          f"(condition_channels={self._condition_channels}).")

  def __call__(self,
               indices: tf.Tensor,
               labels: Optional[tf.Tensor] = None,
               condition: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Computes next-code logits.

    Args:
      indices: [B, H, W] int code indices in [0, num_embeddings).
      labels: [B] int class labels; required iff num_classes was set.
      condition: [B, H, W, condition_channels] float features that do not
        depend on `indices`; required iff condition_channels was set.

    Returns:
      [B, H, W, num_embeddings] float32 logits of each code given the codes
      before it in raster order (and the label and condition).

    Raises:
      ValueError: if labels (condition) are given to an unconditional model
        or missing for a conditional one.
    """
    self._check_labels(labels, condition)
    x = tf.gather(self.embeddings, indices)
    # Shifting the vertical input down one row once makes every vertical
    # feature at row i depend only on rows above i, in every layer.
    vertical = tf.pad(x[:, :-1], [[0, 0], [1, 0], [0, 0], [0, 0]])
    horizontal = x
    for layer in self.layers:
      vertical, horizontal = layer(vertical, horizontal, labels, condition)
    hidden = tf.nn.relu(_conv(tf.nn.relu(horizontal), *self.head_hidden))
    return _conv(hidden, *self.head_logits)

  def sample(self,
             num_samples: int,
             height: int,
             width: int,
             *,
             labels: Optional[tf.Tensor] = None,
             condition: Optional[tf.Tensor] = None,
             temperature: float = 1.0,
             seed: int = 0) -> tf.Tensor:
    """Draws code grids autoregressively, one position at a time.

    Compiled with tf.function: height * width forward passes in one graph.
    Sampling is stateless, so the same seed gives the same grids.

    Args:
      num_samples: B, grids to draw.
      height: H.
      width: W.
      labels: [B] (or scalar, broadcast) int class labels; required iff the
        model is class conditional.
      condition: [B, H, W, condition_channels] features; required iff the
        model has condition_channels.
      temperature: logits are divided by it; > 0, lower is greedier.
      seed: integer seed.

    Returns:
      [B, H, W] int32 code indices in [0, num_embeddings).

    Raises:
      ValueError: on bad labels (see __call__), sizes or temperature.
    """
    check_positive(num_samples=num_samples, height=height, width=width)
    labels, temperature = sampling_args(num_samples, labels,
                                        self._num_classes, temperature)
    self._check_labels(labels, condition)
    return self._sample(num_samples, height, width, labels, temperature,
                        tf.constant([seed, 0], tf.int64), condition)

  @tf.function(autograph=False)
  def _sample(self, num_samples, height, width, labels, temperature, seed,
              condition):
    return self.sample_graph(num_samples, height, width, labels, temperature,
                             seed, condition)

  def sample_graph(self, num_samples, height, width, labels, temperature,
                   seed, condition=None) -> tf.Tensor:
    """`sample`'s graph, for use inside a tf.function (e.g. an export).

    Args:
      num_samples: B, a Python int or a scalar int32 tensor.
      height: H (Python int).
      width: W (Python int).
      labels: [B] int32 labels, or None for an unconditional model.
      temperature: scalar float32 tensor > 0 (not checked here).
      seed: [2] int64 stateless seed.
      condition: [B, H, W, condition_channels] float features, or None for a
        model without condition_channels.

    Returns:
      [B, H, W] int32 codes: one tf.while_loop over the H * W positions.
    """
    positions = tf.reshape(tf.range(height * width), [height, width])

    def body(position, codes):
      logits = tf.reshape(self(codes, labels, condition),
                          [num_samples, height * width, -1])
      draw = tf.random.stateless_categorical(
          logits[:, position] / temperature, 1,
          seed=tf.random.experimental.stateless_fold_in(seed, position),
          dtype=tf.int32)
      return position + 1, tf.where(positions == position, draw[:, :, None],
                                    codes)

    codes = tf.zeros([num_samples, height, width], tf.int32)
    _, codes = tf.while_loop(lambda position, _: position < height * width,
                             body, (0, codes))
    return codes
